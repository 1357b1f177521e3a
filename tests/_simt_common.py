"""Tiny three-task GPPF set-ups shared by the SIMT tests (CPU, seconds).

Tasks: ``mnist_det`` (mmdet FCOS), ``fmnist_seg`` (mmseg FCN head),
``fmnist_cls`` (mmpretrain linear head), on a ResNet-18 with 16 base
channels (stock ``mmdet.ResNet`` or ``LegoResNet``) or a 2-layer LegoViT
(seg and cls only); the task models are the demo config's, shrunk. Images
come either from the demo data sources (:func:`make_demo_data`, tests marked
``data``) or are drawn here (:func:`make_synthetic_data`, no download), in
the same folder layout.
"""
import copy
import functools
import json
import os
import os.path as osp
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Set, Union

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEMO_CONFIG = (
    REPO / 'configs' / 'gppf' / 'gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py')
TASKS = ('mnist_det', 'fmnist_seg', 'fmnist_cls')
MNIST = tuple(str(i) for i in range(10))
FMNIST = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
          'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
SIZE = 64
BASE = 16  # ResNet-18 stage widths 16, 32, 64, 128
# The tiny LegoViT (``kind='lego_vit'``): patch 16 on SIZE-pixel inputs.
VIT_ARCH = dict(
    embed_dims=32, num_layers=2, num_heads=4, feedforward_channels=64)

# Markers of the running test, set by conftest.py before its fixtures.
CURRENT_MARKERS: Set[str] = set()


def require_marker(name: str, what: str) -> None:
    """Fail unless the running test carries ``@pytest.mark.<name>``, so a
    tier that deselects the marker never reaches ``what``."""
    if name not in CURRENT_MARKERS:
        pytest.fail(
            f'{what}: mark the test (or its module) with '
            f'@pytest.mark.{name}',
            pytrace=False)


def make_demo_data(root: Path,
                   num_train: Union[int, Dict[str, int]] = 8,
                   num_val: int = 4) -> Path:
    """Write the three demo datasets (few images) under ``root``.

    Only for tests marked ``data``; fails (never skips) when a data source
    is missing. ``num_train`` is one count or a count per dataset name. If
    the environment names a prepared folder (``GPPF_TEST_DATA``, e.g. on a
    machine without the data sources), that folder is used instead.
    """
    require_marker('data', 'make_demo_data needs the demo data sources')
    prepared = os.environ.get('GPPF_TEST_DATA')
    if prepared:
        return Path(prepared).resolve()
    sys.path.insert(0, str(REPO / 'tools' / 'dataset_converters'))
    try:
        import prepare_demo_data
    finally:
        sys.path.pop(0)
    try:
        counts = [str(num_train)] if isinstance(num_train, int) else [
            f'{name}={n}' for name, n in num_train.items()
        ]
        prepare_demo_data.main([
            '--out',
            str(root), '--datasets', *TASKS, '--num-train', *counts,
            '--num-val',
            str(num_val)
        ])
    except SystemExit as e:  # a data source is not installed here
        pytest.fail(
            f'demo data sources unavailable ({e}): run '
            'tools/dataset_converters/prepare_demo_data.sh, or deselect '
            'these tests with -m "not data"',
            pytrace=False)
    return root


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _canvas(rng: np.random.Generator, size: int = 128, items: int = 3):
    """A dark canvas with 1..``items`` bright rectangles (apart) and their
    labels 0..9; returns the image and ``[(label, x0, y0, x1, y1)]``."""
    img = rng.integers(0, 48, (size, size, 3), dtype=np.uint8)
    placed = []
    for i in range(int(rng.integers(1, items + 1))):
        w, h = (int(v) for v in rng.integers(10, 28, 2))
        x0 = i * (size // items) + int(rng.integers(0, size // items - w))
        y0 = int(rng.integers(0, size - h))
        img[y0:y0 + h, x0:x0 + w] = rng.integers(160, 256, 3, dtype=np.uint8)
        placed.append((int(rng.integers(0, 10)), x0, y0, x0 + w, y0 + h))
    return img, placed


def make_synthetic_data(root: Path,
                        num_train: int = 8,
                        num_val: int = 4,
                        seed: int = 0) -> Path:
    """Draw the three demo datasets (bright rectangles on dark canvases) in
    the demo data's layout under ``root``; no data source needed."""
    rng = np.random.default_rng(seed)
    for split, num in (('train', num_train), ('val', num_val)):
        images, anns = [], []
        for i in range(num):  # mnist_det: COCO boxes
            img, placed = _canvas(rng)
            name = f'{i:06d}.png'
            _write_png(root / 'mnist_det' / split / name, img)
            images.append(dict(id=i, file_name=name, width=128, height=128))
            for label, x0, y0, x1, y1 in placed:
                anns.append(
                    dict(
                        id=len(anns) + 1,
                        image_id=i,
                        category_id=label + 1,
                        bbox=[x0, y0, x1 - x0, y1 - y0],
                        area=float((x1 - x0) * (y1 - y0)),
                        iscrowd=0))
        coco = dict(
            images=images,
            annotations=anns,
            categories=[
                dict(id=k + 1, name=c, supercategory='none')
                for k, c in enumerate(MNIST)
            ])
        ann_file = root / 'mnist_det' / 'annotations' / f'{split}.json'
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        ann_file.write_text(json.dumps(coco))
        for i in range(num):  # fmnist_seg: label maps, 0 = background
            img, placed = _canvas(rng)
            seg = np.zeros(img.shape[:2], np.uint8)
            for label, x0, y0, x1, y1 in placed:
                seg[y0:y1, x0:x1] = label + 1
            _write_png(
                root / 'fmnist_seg' / 'img_dir' / split / f'{i:06d}.png', img)
            _write_png(
                root / 'fmnist_seg' / 'ann_dir' / split / f'{i:06d}.png', seg)
        lines = []
        for i in range(num):  # fmnist_cls: 28x28 items, class-balanced
            label = i % 10
            img = np.full((28, 28, 3), 20 * label, np.uint8)
            img[4 + label:24, 6:22] = rng.integers(160, 256, 3, np.uint8)
            _write_png(root / 'fmnist_cls' / split / f'{label}/{i:05d}.png',
                       img)
            lines.append(f'{label}/{i:05d}.png {label}')
        meta = root / 'fmnist_cls' / 'meta' / f'{split}.txt'
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text('\n'.join(lines) + '\n')
    return root


@functools.lru_cache()
def _demo_task_models() -> dict:
    from mmengine.config import Config
    return Config.fromfile(str(DEMO_CONFIG)).model.tasks.to_dict()


def backbone_cfg(kind: str = 'resnet', base: int = BASE) -> dict:
    """The shared ResNet-18 (``'resnet'``: stock mmdet, ``'lego'``) or
    LegoViT (``'lego_vit'``: two ``featmap`` outputs of ``VIT_ARCH``'s
    width, for SIZE-pixel inputs)."""
    if kind == 'lego_vit':
        return dict(
            type='LegoViT',
            arch=dict(VIT_ARCH),
            img_size=SIZE,
            patch_size=16,
            out_type='featmap',
            out_indices=(0, 1),
            num_legos=4,
            num_active=2,
            router=dict(noise_std=0.0))
    common = dict(
        depth=18,
        base_channels=base,
        out_indices=(0, 1, 2, 3),
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False)
    if kind == 'lego':
        return dict(
            type='LegoResNet',
            num_legos=4,
            num_active=2,
            router=dict(noise_std=0.0),
            **common)
    return dict(type='mmdet.ResNet', **common)


def model_cfg(kind: str = 'resnet',
              loss_weights: Optional[Dict[str, float]] = None,
              base: int = BASE,
              tasks: Sequence[str] = TASKS) -> dict:
    """GPPF with the demo config's FCOS / FCN / linear task models, shrunk
    onto a shared tiny ResNet-18 whose stage widths are ``base * (1, 2, 4,
    8)`` (or the tiny LegoViT, ``kind='lego_vit'``): thinner heads, IoU box
    loss, no head norm or dropout, SIZE-pixel segmentation inputs. Only the
    named ``tasks`` are kept."""
    names = tasks
    tasks = copy.deepcopy(_demo_task_models())
    det, seg, cls = (tasks[t] for t in TASKS)
    widths = [VIT_ARCH['embed_dims']] * 4 if kind == 'lego_vit' else [
        base, base * 2, base * 4, base * 8
    ]
    det['neck'].update(in_channels=widths, out_channels=32)
    det['bbox_head'].update(
        in_channels=32,
        stacked_convs=1,
        feat_channels=32,
        regress_ranges=((-1, 16), (16, 32), (32, 1e8)),
        norm_cfg=None,
        loss_bbox=dict(type='IoULoss', loss_weight=1.0))
    # score_thr 0: a detector trained for a few steps from FCOS's prior
    # (class scores near 0.01) still returns boxes for the metric to score.
    det['test_cfg'].update(nms_pre=100, score_thr=0.0)
    seg['decode_head'].update(
        in_channels=widths[1], channels=32, num_convs=1, dropout_ratio=0.0)
    seg['data_preprocessor'].update(size=(SIZE, SIZE))
    cls['head'].update(in_channels=widths[3])
    tasks = {name: tasks[name] for name in names}
    preprocessors = {}
    for task, cfg in tasks.items():  # one multi-task preprocessor
        pre = cfg.pop('data_preprocessor')
        pre['type'] = f"{cfg['_scope_']}.{pre['type']}"
        preprocessors[task] = pre
    return dict(
        type='GPPF',
        backbone=backbone_cfg(kind, base),
        tasks=tasks,
        loss_weights=loss_weights,
        data_preprocessor=dict(
            type='MultiTaskDataPreprocessor', preprocessors=preprocessors))


def datasets(root: Path, split: str) -> Dict[str, dict]:
    """Dataset config per task for ``split`` ('train' or 'val')."""
    train = split == 'train'
    det_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='Resize', scale=(SIZE, SIZE), keep_ratio=True),
        dict(
            type='PackDetInputs',
            meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                       'scale_factor'))
    ]
    seg_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(SIZE, SIZE), keep_ratio=True),
        dict(type='LoadAnnotations'),
        dict(type='PackSegInputs')
    ]
    cls_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(32, 32)),
        dict(type='PackInputs')
    ]
    return dict(
        mnist_det=dict(
            _scope_='mmdet',
            type='CocoDataset',
            data_root=str(root / 'mnist_det'),
            ann_file=f'annotations/{split}.json',
            data_prefix=dict(img=f'{split}/'),
            metainfo=dict(classes=MNIST),
            filter_cfg=dict(filter_empty_gt=train),
            test_mode=not train,
            pipeline=det_pipeline),
        fmnist_seg=dict(
            _scope_='mmseg',
            type='BaseSegDataset',
            data_root=str(root / 'fmnist_seg'),
            data_prefix=dict(
                img_path=f'img_dir/{split}', seg_map_path=f'ann_dir/{split}'),
            img_suffix='.png',
            seg_map_suffix='.png',
            metainfo=dict(classes=('background', ) + FMNIST),
            pipeline=seg_pipeline),
        fmnist_cls=dict(
            _scope_='mmpretrain',
            type='CustomDataset',
            data_root=str(root / 'fmnist_cls'),
            ann_file=f'meta/{split}.txt',
            data_prefix=split,
            metainfo=dict(classes=FMNIST),
            pipeline=cls_pipeline))


def dataloaders(root: Path,
                split: str,
                batch_size: int = 2,
                shuffle: bool = True) -> Dict[str, dict]:
    """Dataloader config per task (InfiniteSampler for training)."""
    train = split == 'train'
    sampler = dict(
        type='InfiniteSampler' if train else 'DefaultSampler',
        shuffle=shuffle and train)
    return {
        task:
        dict(
            batch_size=batch_size,
            num_workers=0,
            sampler=copy.deepcopy(sampler),
            dataset=dataset)
        for task, dataset in datasets(root, split).items()
    }


def evaluators(root: Path) -> Dict[str, dict]:
    """Stock metric per task."""
    return dict(
        mnist_det=dict(
            type='mmdet.CocoMetric',
            ann_file=osp.join(root, 'mnist_det', 'annotations', 'val.json'),
            metric='bbox'),
        fmnist_seg=dict(type='mmseg.IoUMetric', iou_metrics=['mIoU']),
        fmnist_cls=dict(type='mmpretrain.Accuracy', topk=(1, )))


def runner_cfg(root: Path,
               work_dir: Path,
               max_iters: int = 4,
               kind: str = 'resnet',
               val: bool = True,
               checkpoint_interval: int = 1000,
               batch_size: int = 2,
               **overrides) -> dict:
    """A complete Runner config of a tiny SIMT pre-training."""
    cfg = dict(
        default_scope='mmengine',
        model=model_cfg(kind),
        work_dir=str(work_dir),
        train_dataloader=dataloaders(root, 'train', batch_size),
        train_cfg=dict(
            type='SIMTTrainLoop', max_iters=max_iters, val_interval=10**6),
        optim_wrapper=dict(
            type='OptimWrapper',
            optimizer=dict(type='SGD', lr=0.01, momentum=0.9),
            clip_grad=dict(max_norm=10.0)),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.5, by_epoch=False, end=2)
        ],
        default_hooks=dict(
            timer=dict(type='IterTimerHook'),
            logger=dict(type='LoggerHook', interval=1),
            param_scheduler=dict(type='ParamSchedulerHook'),
            checkpoint=dict(
                type='SafeCheckpointHook',
                interval=checkpoint_interval,
                by_epoch=False)),
        randomness=dict(seed=0),
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        log_processor=dict(by_epoch=False),
        log_level='WARNING')
    if val:
        cfg.update(
            val_dataloader=dataloaders(root, 'val', batch_size),
            val_evaluator=evaluators(root),
            val_cfg=dict(type='SIMTValLoop'))
    cfg.update(overrides)
    return cfg
