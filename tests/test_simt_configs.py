"""The shipped configs build: model and SIMT loops (datasets may be absent).

For the COCO/ADE20K/ImageNet and GPPF-15M configs, whose datasets are not
here, the loops are built with dataloaders and evaluators replaced by
stand-ins that check every dataset, transform and metric type resolves in
its own library's registry. The demo config trains two iterations and
evaluates on a few real demo images.
"""
import copy
from pathlib import Path

import pytest
import torch
from _simt_common import REPO, TASKS, make_demo_data
from mmengine.config import Config
from mmengine.evaluator import Evaluator
from mmengine.registry import DATASETS, METRICS, TRANSFORMS
from mmengine.runner import Runner
from torch.utils.data import DataLoader, Dataset

import projects.gppf  # noqa: F401
import projects.gppf.engine  # noqa: F401
from projects.gppf.engine import SIMTTestLoop, SIMTTrainLoop, SIMTValLoop

CONFIGS = REPO / 'configs' / 'gppf'
COCO_ADE_IN1K = CONFIGS / 'gppf_lego-r50_8xb2-2-32-90k_coco-ade20k-in1k.py'
GPPF_15M = CONFIGS / 'gppf_lego-r50_16xb2-2-32-150k_gppf-15m.py'
DEMO = CONFIGS / 'gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py'


class _OneItem(Dataset):

    def __init__(self, metainfo):
        self.metainfo = metainfo

    def __len__(self):
        return 1

    def __getitem__(self, idx):
        return {}


def _resolve(registry, cfg, scope, what):
    with registry.switch_scope_and_registry(scope) as reg:
        cls = reg.get(cfg['type'])
    assert cls is not None, f'{what} {cfg["type"]!r} not found in {scope}'
    return cls


def _check_dataset(cfg, scope):
    scope = cfg.get('_scope_', scope)
    _resolve(DATASETS, cfg, scope, 'dataset')
    if 'dataset' in cfg:  # dataset wrappers
        _check_dataset(cfg['dataset'], scope)
    for transform in cfg.get('pipeline', []):
        _resolve(TRANSFORMS, transform, scope, 'transform')


def _fake_build_dataloader(dataloader, seed=None, diff_rank_seed=False):
    _check_dataset(dataloader['dataset'], None)
    return DataLoader(_OneItem(dict(classes=('x', ))), batch_size=1)


def _fake_build_evaluator(self, evaluator):
    metrics = evaluator if isinstance(evaluator, list) else [evaluator]
    for metric in metrics:
        _resolve(METRICS, metric, metric.get('_scope_'), 'metric')
    return Evaluator([])


@pytest.fixture
def stub_data(monkeypatch):
    monkeypatch.setattr(Runner, 'build_dataloader',
                        staticmethod(_fake_build_dataloader))
    monkeypatch.setattr(Runner, 'build_evaluator', _fake_build_evaluator)


@pytest.mark.parametrize(
    'path, tasks, evaluated',
    [
        (COCO_ADE_IN1K, ['coco_det', 'ade20k_seg', 'in1k_cls'], 3),
        pytest.param(
            GPPF_15M, [
                'in21k_cls', 'in1k_cls', 'coco_det', 'o365_det', 'v3det_det',
                'ade20k_seg', 'cocostuff_seg', 'cityscapes_seg'
            ],
            7,
            marks=pytest.mark.slow),  # 8 R50 task models: the slowest build
    ])
def test_pretraining_config_builds(stub_data, tmp_path, path, tasks,
                                   evaluated):
    cfg = Config.fromfile(str(path))
    cfg.work_dir = str(tmp_path)
    runner = Runner.from_cfg(cfg)
    model = runner.model
    assert model.task_names == tasks
    libraries = {'det': 'mmdet', 'seg': 'mmseg', 'cls': 'mmpretrain'}
    for task in tasks:
        library = libraries[task.rsplit('_', 1)[1]]
        assert model.task_scopes[task] == library
        assert type(model.tasks[task]).__module__.startswith(library)
        assert type(
            model.data_preprocessor.preprocessors[task]).__module__.startswith(
                library)
        assert model.tasks[task].backbone is model.backbone
    assert type(model.backbone).__name__ == 'LegoResNet'
    assert isinstance(runner.train_loop, SIMTTrainLoop)
    assert runner.train_loop.tasks == tasks
    assert isinstance(runner.val_loop, SIMTValLoop)
    assert len(runner.val_loop.tasks) == evaluated
    assert isinstance(runner.test_loop, SIMTTestLoop)
    for task, loader in cfg.train_dataloader.items():
        assert loader.sampler.type == 'InfiniteSampler', task


def _reroot(obj, old, new):
    if isinstance(obj, dict):
        return {k: _reroot(v, old, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_reroot(v, old, new) for v in obj)
    if isinstance(obj, str) and obj.startswith(old):
        return new + obj[len(old):]
    return obj


@pytest.mark.data
def test_demo_config_trains_and_evaluates(tmp_path):
    root = make_demo_data(tmp_path / 'data', num_train=8, num_val=4)
    cfg = Config.fromfile(str(DEMO))
    assert cfg.model.backbone.type == 'LegoResNet'
    assert cfg.model.backbone.depth == 18
    cfg = Config(_reroot(cfg.to_dict(), cfg.data_root, str(root) + '/'))
    cfg.work_dir = str(tmp_path / 'work')
    cfg.train_cfg.max_iters = 2
    cfg.train_cfg.val_interval = 2
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = 2
    cfg.custom_hooks[0].freeze_iter = 1
    # Two steps from FCOS's prior leave every score below 0.05: keep boxes.
    cfg.model.tasks.mnist_det.test_cfg.score_thr = 0.0
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.message_hub.log_scalars
    for key in ('mnist_det/coco/bbox_mAP', 'fmnist_seg/mIoU',
                'fmnist_cls/accuracy/top1'):
        assert f'val/{key}' in metrics
    work = Path(cfg.work_dir)
    assert (work / 'iter_2.pth').exists()
    assert list((work / 'route_heatmaps').glob('*.png'))
    assert set(runner.train_loop.tasks) == set(TASKS)
    ckpt = torch.load(work / 'iter_2.pth', weights_only=True)
    assert any(k.startswith('backbone.router') for k in ckpt['state_dict'])
    # A deep copy (EMA-style hooks make one) keeps one shared backbone.
    clone = copy.deepcopy(runner.model)
    assert clone.backbone is not runner.model.backbone
    assert all(m.backbone is clone.backbone for m in clone.tasks.values())
    for (key, a), b in zip(runner.model.state_dict().items(),
                           clone.state_dict().values()):
        assert torch.equal(a, b), key

    # tools/test.py evaluates the checkpoint on every task.
    from tools.test import main as test_main
    cfg.dump(str(tmp_path / 'demo.py'))
    metrics = test_main([
        str(tmp_path / 'demo.py'),
        str(work / 'iter_2.pth'), '--work-dir',
        str(tmp_path / 'test'), '--out',
        str(tmp_path / 'preds.pkl')
    ])
    assert {k.split('/')[0] for k in metrics} == set(TASKS)
    for task in TASKS:
        assert (tmp_path / f'preds_{task}.pkl').exists()
