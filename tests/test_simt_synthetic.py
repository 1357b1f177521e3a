"""The SIMT model and loops on drawn images (fast tier: no data sources).

The tiny three-task set-up of ``_simt_common`` reads images that
:func:`make_synthetic_data` draws in the demo data's layout, through the
stock dataset classes, pipelines and metrics of each library.
"""
import math
from pathlib import Path

import pytest
import torch
from _simt_common import TASKS, dataloaders, make_synthetic_data, runner_cfg
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import projects.gppf  # noqa: F401
import projects.gppf.engine  # noqa: F401  (registers the loops)


@HOOKS.register_module(force=True)
class _SyntheticItersHook(Hook):
    """Records the iterations the loop ran."""

    def __init__(self):
        self.iters = []

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        self.iters.append(runner.iter)


@pytest.fixture(scope='module')
def root(tmp_path_factory) -> Path:
    return make_synthetic_data(tmp_path_factory.mktemp('synthetic'), 8, 4)


def test_drawn_data_reads_with_the_stock_datasets(root):
    batches = {
        task: next(iter(Runner.build_dataloader(cfg, seed=0)))
        for task, cfg in dataloaders(root, 'train', 2, False).items()
    }
    det = batches['mnist_det']['data_samples']
    for sample in det:
        boxes = sample.gt_instances.bboxes
        boxes = getattr(boxes, 'tensor', boxes)
        h, w = sample.img_shape
        assert len(boxes) >= 1
        assert (boxes[:, 2:] <= torch.tensor([w, h])).all()
        assert (boxes[:, :2] < boxes[:, 2:]).all()
    for sample in batches['fmnist_seg']['data_samples']:
        labels = sample.gt_sem_seg.data.unique()
        assert 0 in labels and labels.max() <= 10 and len(labels) >= 2
    cls = batches['fmnist_cls']['data_samples']
    assert [int(s.gt_label) for s in cls] == [0, 1]


@pytest.mark.parametrize('kind', ['resnet', 'lego'])
def test_every_task_trains_the_shared_backbone(root, tmp_path, kind):
    cfg = runner_cfg(root, tmp_path, max_iters=2, kind=kind, val=False)
    runner = Runner.from_cfg(Config(cfg))
    before = {
        k: v.clone()
        for k, v in runner.model.state_dict().items() if v.is_floating_point()
    }
    runner.train()
    assert runner.iter == 2
    scalars = runner.message_hub.log_scalars
    for key in ('mnist_det/loss_cls', 'fmnist_seg/decode.loss_ce',
                'fmnist_cls/loss', 'loss'):
        assert math.isfinite(scalars[f'train/{key}'].current()), key
    after = runner.model.state_dict()
    for prefix in ('backbone.', *(f'tasks.{t}.' for t in TASKS)):
        moved = [
            k for k, v in before.items()
            if k.startswith(prefix) and not torch.equal(v, after[k])
        ]
        assert moved, f'no parameter under {prefix} changed'


def test_loop_validates_every_task_and_resumes(root, tmp_path):
    cfg = runner_cfg(
        root,
        tmp_path,
        max_iters=2,
        checkpoint_interval=2,
        experiment_name='synthetic_first')
    cfg['train_cfg']['val_interval'] = 2
    runner = Runner.from_cfg(Config(cfg))
    runner.train()
    val = runner.message_hub.log_scalars
    for key in ('mnist_det/coco/bbox_mAP', 'fmnist_seg/mIoU',
                'fmnist_cls/accuracy/top1'):
        assert f'val/{key}' in val, sorted(val)
    assert (tmp_path / 'iter_2.pth').is_file()

    cfg = runner_cfg(
        root,
        tmp_path,
        max_iters=3,
        val=False,
        resume=True,
        experiment_name='synthetic_resumed',
        custom_hooks=[dict(type='_SyntheticItersHook')])
    resumed = Runner.from_cfg(Config(cfg))
    resumed.train()
    iters = next(
        h for h in resumed.hooks if isinstance(h, _SyntheticItersHook)).iters
    assert iters == [2] and resumed.iter == 3
