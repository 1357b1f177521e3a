"""SIMT loops with mmengine's Runner: hooks, logs, evaluation, resume."""
import glob
import os.path as osp

import pytest
import torch
from _simt_common import TASKS, make_demo_data, runner_cfg
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import projects.gppf  # noqa: F401
import projects.gppf.engine  # noqa: F401  (registers the loops)

pytestmark = pytest.mark.data


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp('gppf_loops'))


@HOOKS.register_module()
class _RecordBatchesHook(Hook):
    """Records, per iteration, each task's image paths and losses."""

    def __init__(self):
        self.records = {}

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        paths = {
            task: [s.img_path for s in batch['data_samples']]
            for task, batch in data_batch.items()
        }
        losses = {k: float(v) for k, v in outputs.items() if 'loss' in k}
        self.records[runner.iter] = (paths, losses)


def _recorder(runner):
    return next(h for h in runner.hooks if isinstance(h, _RecordBatchesHook))


def test_train_validate_and_test(demo_root, tmp_path):
    cfg = runner_cfg(
        demo_root, tmp_path, max_iters=3, checkpoint_interval=3,
        log_level='INFO',
        custom_hooks=[dict(type='_RecordBatchesHook')])
    cfg['train_cfg']['val_interval'] = 3
    runner = Runner.from_cfg(Config(cfg))
    runner.train()
    hub = runner.message_hub
    # Per-task losses and times reach the logs through the stock hooks.
    for key in ('loss', 'mnist_det/loss_cls', 'mnist_det/time',
                'fmnist_seg/decode.loss_ce', 'fmnist_seg/time',
                'fmnist_cls/loss', 'fmnist_cls/time', 'grad_norm', 'lr'):
        assert f'train/{key}' in hub.log_scalars, key
    assert runner.iter == 3
    # The runner-facing dataloader: one batch per task, each task's meta.
    loader = runner.train_loop.dataloader
    assert loader.keys() == list(TASKS)
    assert loader.dataset.metainfo['fmnist_cls']['classes'][0] == \
        'T-shirt/top'
    assert loader.batch_size == dict.fromkeys(TASKS, 2)
    paths, _ = _recorder(runner).records[0]
    assert {t: len(p) for t, p in paths.items()} == dict.fromkeys(TASKS, 2)
    # Param scheduler (LinearLR over 2 iterations) and checkpoint.
    assert runner.optim_wrapper.get_lr()['lr'][0] == pytest.approx(0.01)
    ckpt = torch.load(osp.join(tmp_path, 'iter_3.pth'), weights_only=True)
    assert set(ckpt['meta']['dataset_meta']) == set(TASKS)
    assert not any('backbone' in k and not k.startswith('backbone.')
                   for k in ckpt['state_dict'])
    # Validation ran after iteration 3: prefixed metrics of the 3 tasks
    # from each library's stock metric, and the per-task table.
    val = {k[4:]: v for k, v in hub.log_scalars.items()
           if k.startswith('val/')}
    for key in ('mnist_det/coco/bbox_mAP', 'fmnist_seg/mIoU',
                'fmnist_cls/accuracy/top1'):
        assert key in val, sorted(val)
    metrics = {t: type(e.metrics[0]) for t, e in runner.val_evaluator.items()}
    assert metrics['mnist_det'].__module__.startswith('mmdet.evaluation')
    assert metrics['fmnist_seg'].__module__.startswith('mmseg.evaluation')
    assert metrics['fmnist_cls'].__module__.startswith(
        'mmpretrain.evaluation')
    log = open(glob.glob(osp.join(tmp_path, '*', '*.log'))[0]).read()
    assert 'val metrics per task' in log and '| fmnist_seg |' in log


def test_val_and_test_loops_return_prefixed_metrics(demo_root, tmp_path):
    cfg = runner_cfg(demo_root, tmp_path)
    cfg.update(
        test_dataloader=cfg['val_dataloader'],
        test_evaluator=cfg['val_evaluator'],
        test_cfg=dict(type='SIMTTestLoop'))
    runner = Runner.from_cfg(Config(cfg))
    val = runner.val()
    test = runner.test()
    for metrics in (val, test):
        assert {k.split('/')[0] for k in metrics} == set(TASKS)
        assert 0 <= metrics['mnist_det/coco/bbox_mAP'] <= 1
        assert 0 <= metrics['fmnist_seg/mIoU'] <= 100
        assert 0 <= metrics['fmnist_cls/accuracy/top1'] <= 100
    # len() of the evaluation loader counts the batches of all tasks.
    assert len(runner.val_loop.dataloader) == 3 * 2


def test_evaluate_a_subset_of_tasks(demo_root, tmp_path):
    cfg = runner_cfg(demo_root, tmp_path)
    for key in ('val_dataloader', 'val_evaluator'):
        cfg[key].pop('mnist_det')
    cfg['val_cfg'] = dict(type='SIMTValLoop', tasks=TASKS[1:])
    metrics = Runner.from_cfg(Config(cfg)).val()
    assert {k.split('/')[0] for k in metrics} == set(TASKS[1:])


@pytest.mark.parametrize('kind', ['resnet', 'lego'])
def test_resume_restores_every_loader(demo_root, tmp_path, kind):
    """Resume at iteration 2 of 4: the same batches (each task's loader at
    its position) and the same losses as an uninterrupted run."""
    hooks = [dict(type='_RecordBatchesHook')]
    full = Runner.from_cfg(Config(runner_cfg(
        demo_root, tmp_path / 'full', max_iters=4, kind=kind, val=False,
        custom_hooks=hooks, experiment_name=f'full_{kind}')))
    full.train()
    expected = _recorder(full).records

    # Interrupted after iteration 2 (its checkpoint is written at 2).
    first = Runner.from_cfg(Config(runner_cfg(
        demo_root, tmp_path / 'part', max_iters=2, kind=kind, val=False,
        checkpoint_interval=2, custom_hooks=hooks,
        experiment_name=f'first_{kind}')))
    first.train()
    assert osp.exists(tmp_path / 'part' / 'iter_2.pth')

    resumed = Runner.from_cfg(Config(runner_cfg(
        demo_root, tmp_path / 'part', max_iters=4, kind=kind, val=False,
        custom_hooks=hooks, resume=True,
        load_from=str(tmp_path / 'part' / 'iter_2.pth'),
        experiment_name=f'resumed_{kind}')))
    resumed.train()
    got = _recorder(resumed).records
    assert sorted(got) == [2, 3]
    for it in (2, 3):
        paths, losses = got[it]
        exp_paths, exp_losses = expected[it]
        assert paths == exp_paths, it
        assert set(losses) == set(exp_losses)
        for key, value in losses.items():
            assert value == pytest.approx(exp_losses[key], rel=1e-4,
                                          abs=1e-5), (it, key)
    # The batches did move: iteration 3 differs from iteration 2.
    assert got[2][0] != got[3][0]
