"""Batches of random images and targets in the format a task's stock
dataloader yields (``dict(inputs=[uint8 CxHxW], data_samples=[...])``), so
that a benchmark can run a config's tasks at their real batch shapes on a
machine without their datasets.

The target type follows the task model's library: mmdet detectors get
mmdet's ``demo_mm_inputs`` (random boxes and labels), mmseg segmentors a
random label map, mmpretrain classifiers a random label. Labels are drawn
below the largest ``num_classes`` found in the task model.
"""
import re
from typing import Dict, Mapping, Tuple

import torch
import torch.nn as nn

__all__ = ['parse_shapes', 'synthetic_batch']

Shape = Tuple[int, int, int]  # batch, height, width
_SHAPE = re.compile(r'^(\d+)x(\d+)x(\d+)$')
#: boxes per detection image (COCO's mean is 7.3)
BOXES_PER_IMAGE = 7


def parse_shapes(specs: Mapping[str, str]) -> Dict[str, Shape]:
    """``{task: 'BxHxW'}`` -> ``{task: (B, H, W)}``.

    Raises:
        ValueError: a spec is not three positive integers joined by ``x``.
    """
    shapes = {}
    for task, spec in specs.items():
        match = _SHAPE.match(str(spec))
        if not match or 0 in map(int, match.groups()):
            raise ValueError(f'--synthetic {task}={spec}: expected '
                             f'BATCHxHEIGHTxWIDTH, e.g. {task}=2x800x1344')
        shapes[task] = tuple(int(g) for g in match.groups())
    return shapes


def _num_classes(model: nn.Module) -> int:
    """The largest integer ``num_classes`` of ``model``'s modules (1 if
    none has one)."""
    found = [
        m.num_classes for m in model.modules()
        if isinstance(getattr(m, 'num_classes', None), int)
    ]
    return max(found, default=1)


def synthetic_batch(model: nn.Module, shape: Shape, seed: int = 0) -> dict:
    """A random batch of ``shape`` for the stock task ``model``.

    Raises:
        TypeError: ``model`` is not an mmdet detector, an mmseg segmentor
            or an mmpretrain classifier.
    """
    from mmdet.models.detectors import BaseDetector
    from mmpretrain.models.classifiers import BaseClassifier
    from mmseg.models.segmentors import BaseSegmentor

    batch, height, width = shape
    classes = _num_classes(model)
    gen = torch.Generator().manual_seed(seed)
    if isinstance(model, BaseDetector):
        from mmdet.testing import demo_mm_inputs
        return demo_mm_inputs(
            batch, [(3, height, width)] * batch,
            num_items=[BOXES_PER_IMAGE] * batch,
            num_classes=classes)
    images = [
        torch.randint(0, 256, (3, height, width), generator=gen).byte()
        for _ in range(batch)
    ]
    if isinstance(model, BaseSegmentor):
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        samples = []
        for _ in range(batch):
            sample = SegDataSample(
                gt_sem_seg=PixelData(
                    data=torch.randint(
                        0, classes, (1, height, width), generator=gen)))
            sample.set_metainfo(
                dict(
                    img_shape=(height, width),
                    ori_shape=(height, width),
                    pad_shape=(height, width),
                    scale_factor=(1.0, 1.0),
                    flip=False))
            samples.append(sample)
        return dict(inputs=images, data_samples=samples)
    if isinstance(model, BaseClassifier):
        from mmpretrain.structures import DataSample
        labels = torch.randint(0, classes, (batch, ), generator=gen)
        return dict(
            inputs=images,
            data_samples=[
                DataSample(metainfo=dict(img_shape=(height,
                                                    width))).set_gt_label(
                                                        int(label))
                for label in labels
            ])
    raise TypeError(f'no synthetic batch for a {type(model).__name__}: '
                    'expected an mmdet detector, an mmseg segmentor or an '
                    'mmpretrain classifier')
