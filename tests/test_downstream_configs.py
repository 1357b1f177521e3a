"""The downstream benchmark configs of ``configs/downstream/``.

Every config loads, names no dataset of the GPPF-15M pre-training, builds its
stock model with the backbone taken from a GPPF checkpoint in both ways (the
export of a pre-training task's sub-network loaded into the stock ResNet, and
a ``LegoResNet`` whose new task copies a pre-training task's route, switched
on with the ``--cfg-options`` of docs/downstream.md), and one training step
runs on 64x64 synthetic inputs in the config's own data-sample format (every
config by export, one per library by route copy).
The GPPF checkpoint is a randomly initialised LegoResNet-50 routing the eight
pre-training tasks, written by the test: nothing is downloaded.
"""
import argparse
import copy
import functools
import importlib.util
import math
import os
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from mmengine.config import Config, DictAction
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope

import projects.gppf  # noqa: F401  (registers LegoResNet)
from projects.gppf.models import LegoResNet

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / 'configs' / 'downstream').glob('*.py'))
PRETRAIN = ROOT / 'configs/gppf/gppf_lego-r50_16xb2-2-32-150k_gppf-15m.py'
# Dataset classes that read any data, not one dataset.
GENERIC_TYPES = {'CocoDataset', 'BaseSegDataset', 'CustomDataset'}


@functools.lru_cache(maxsize=None)
def _parsed(path: Path) -> Config:
    return Config.fromfile(str(path))


def _config(path: Path) -> Config:
    """A fresh copy of the parsed config (parsing a config with ``mmdet::``
    bases takes about a second; every test of a config reads it)."""
    return copy.deepcopy(_parsed(Path(path)))


def _ids(paths: List[Path]) -> List[str]:
    return [p.stem for p in paths]


# One config per library: the route-copy way trains one step on these only
# (the others share its backbone arguments), and the fast tier builds these
# only (the others are marked slow: full-size models, seconds each).
_ONE_PER_LIBRARY = {
    'faster-rcnn_gppf-r50_fpn_1x_voc0712',
    'deeplabv3plus_gppf-r50-d8_4xb4-40k_voc12aug-512x512',
    'resnet50-gppf_8xb8-100e_food101'
}
BUILDS = [
    pytest.param(
        p,
        id=p.stem,
        marks=() if p.stem in _ONE_PER_LIBRARY else pytest.mark.slow)
    for p in CONFIGS
]


def _walk(node, found: Dict[str, set]) -> None:
    """Collect the dataset types and the data paths under ``node``."""
    if isinstance(node, dict):
        if isinstance(node.get('type'), str) and 'pipeline' in node:
            found['types'].add(node['type'])
        for key in ('data_root', 'ann_file'):
            if isinstance(node.get(key), str):
                found['paths'].add(os.path.normpath(node[key]))
        for value in node.values():
            _walk(value, found)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _walk(value, found)


def _datasets(cfg) -> Dict[str, set]:
    found = dict(types=set(), paths=set())
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader',
                'val_evaluator', 'test_evaluator'):
        _walk(cfg.get(key), found)
    return found


@pytest.fixture(scope='module')
def pretraining():
    """The pre-training tasks and their dataset types and data roots."""
    cfg = Config.fromfile(str(PRETRAIN))
    found = dict(types=set(), paths=set())
    for loader in cfg.train_dataloader.values():
        _walk(loader.to_dict(), found)
    roots = set()
    for loader in cfg.train_dataloader.values():
        ds = loader.dataset
        while 'dataset' in ds:
            ds = ds.dataset
        roots.add(os.path.normpath(ds.data_root))
    return dict(
        tasks=list(cfg.train_dataloader),
        types=found['types'] - GENERIC_TYPES,
        roots=roots)


@pytest.fixture(scope='module')
def gppf_ckpt(tmp_path_factory, pretraining):
    """A GPPF-R50 checkpoint routing the pre-training tasks (distinct random
    routes and norm statistics per task) and the lego2resnet export of each
    task the configs start from."""
    tmp = tmp_path_factory.mktemp('gppf')
    torch.manual_seed(0)
    backbone = LegoResNet(
        depth=50, tasks=pretraining['tasks'], task_norm='stats')
    backbone.init_weights()
    with torch.no_grad():
        backbone.router.logits.normal_()
        for name, buf in backbone.named_buffers():
            if name.endswith('running_mean'):
                buf.normal_()
    backbone.router.freeze(backbone.tasks)
    state = {f'backbone.{k}': v for k, v in backbone.state_dict().items()}
    path = tmp / 'iter_150000.pth'
    torch.save(dict(state_dict=state, meta=dict()), path)
    spec = importlib.util.spec_from_file_location(
        'lego2resnet', ROOT / 'tools/model_converters/lego2resnet.py')
    lego2resnet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lego2resnet)
    sources = {_config(c).gppf_source for c in CONFIGS}
    exports = {}
    for task in sorted(sources):
        exports[task] = tmp / f'gppf-r50_{task}.pth'
        lego2resnet.convert(str(path), task, str(exports[task]))
    return dict(
        path=path,
        state=backbone.state_dict(),
        tasks=list(backbone.tasks),
        exports=exports)


def route_copy_options(cfg, checkpoint) -> List[str]:
    """The route-copy switch of docs/downstream.md, as typed."""
    task = cfg.gppf_task
    return [
        'model.backbone.type=LegoResNet', f'model.backbone.tasks=[{task}]',
        f'model.backbone.task={task}',
        f'model.backbone.init_cfg.checkpoint={checkpoint}',
        f'model.backbone.init_cfg.task_map.{task}={cfg.gppf_source}',
        'find_unused_parameters=True'
    ]


def _parse_options(options: List[str]) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(['--cfg-options'] + options).cfg_options


def _registry(scope: str):
    if scope == 'mmdet':
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    elif scope == 'mmseg':
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    else:
        from mmpretrain.registry import MODELS
        from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    return MODELS


def _build(cfg):
    """The model as ``tools/train.py`` builds it, its weights initialised;
    inputs shrunk to 64x64."""
    model_cfg = cfg.model
    if model_cfg.get('data_preprocessor') is None and cfg.get(
            'data_preprocessor') is not None:  # mmpretrain keeps it on top
        model_cfg.data_preprocessor = cfg.data_preprocessor
    preproc = model_cfg.get('data_preprocessor') or {}
    if 'size' in preproc:  # mmseg pads every image to the crop size
        preproc['size'] = (64, 64)
    if preproc.get('batch_augments'):  # CrowdDet resizes to 1400x800
        preproc['batch_augments'] = None
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = _registry(cfg.default_scope).build(model_cfg)
        model.init_weights()
    return revert_sync_batchnorm(model)


def _batch(cfg, scope: str) -> dict:
    torch.manual_seed(0)
    shape = (3, 64, 64)
    if scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        with_mask = cfg.model.type == 'MaskRCNN'
        batch = demo_mm_inputs(
            batch_size=2,
            image_shapes=[shape] * 2,
            num_items=[2, 3],
            num_classes=2,
            with_mask=with_mask)
        for sample in batch['data_samples']:  # class 0: fits every head
            sample.gt_instances.labels.zero_()
        return batch
    inputs = [
        torch.randint(0, 256, shape, dtype=torch.uint8) for _ in range(2)
    ]
    if scope == 'mmseg':
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        samples = []
        for _ in inputs:
            sample = SegDataSample(
                metainfo=dict(img_shape=shape[1:], ori_shape=shape[1:]))
            sample.gt_sem_seg = PixelData(
                data=torch.randint(0, 2, (1, ) + shape[1:]))
            samples.append(sample)
        return dict(inputs=inputs, data_samples=samples)
    from mmpretrain.structures import DataSample
    samples = [DataSample().set_gt_label(i) for i in range(len(inputs))]
    return dict(inputs=inputs, data_samples=samples)


def _train_step(model, cfg) -> None:
    model.train()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-3))
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        log_vars = model.train_step(_batch(cfg, cfg.default_scope), wrapper)
    assert log_vars['loss'] > 0
    for name, value in log_vars.items():
        assert math.isfinite(float(value)), (name, value)


def test_22_benchmarks():
    scopes = [_config(c).default_scope for c in CONFIGS]
    assert len(CONFIGS) == 22
    assert scopes.count('mmpretrain') == 8
    assert scopes.count('mmdet') == 7
    assert scopes.count('mmseg') == 7


@pytest.mark.parametrize('path', CONFIGS, ids=_ids(CONFIGS))
def test_config_names_no_pretraining_dataset(path, pretraining):
    cfg = _config(path)
    assert cfg.custom_imports.imports == ['projects.gppf']
    assert cfg.gppf_source in pretraining['tasks']
    assert cfg.gppf_task not in pretraining['tasks']
    found = _datasets(cfg)
    assert found['types'] and found['paths']
    assert not found['types'] & pretraining['types']
    for data in found['paths']:
        for root in pretraining['roots']:
            assert os.path.commonpath([data, root]) != root, (data, root)
    # The stock backbone, loaded from the export of the source task.
    backbone = cfg.model.backbone
    assert backbone.type == 'ResNet' and backbone.depth == 50
    assert backbone.get('deep_stem', False) is False
    assert backbone.init_cfg == dict(
        type='CheckedPretrained',
        prefix='backbone.',
        checkpoint=cfg.gppf_export)
    assert cfg.gppf_source in cfg.gppf_export
    assert cfg.model.get('pretrained') is None
    assert cfg.model.get('init_cfg') is None


@pytest.mark.parametrize('path', BUILDS)
def test_export_builds_loads_and_trains(path, gppf_ckpt):
    cfg = _config(path)
    export = gppf_ckpt['exports'][cfg.gppf_source]
    cfg.merge_from_dict(
        _parse_options([f'model.backbone.init_cfg.checkpoint={export}']))
    model = _build(cfg)
    # Every backbone tensor is the export's: nothing left at random.
    given = torch.load(export, map_location='cpu')['state_dict']
    ours = model.backbone.state_dict()
    assert set(ours) == {k[len('backbone.'):] for k in given}
    for key, value in ours.items():
        torch.testing.assert_close(value, given[f'backbone.{key}'])
    _train_step(model, cfg)


@pytest.mark.parametrize('path', BUILDS)
def test_route_copy_builds_loads_and_trains(path, gppf_ckpt):
    cfg = _config(path)
    cfg.merge_from_dict(
        _parse_options(route_copy_options(cfg, gppf_ckpt['path'])))
    assert cfg.find_unused_parameters is True
    model = _build(cfg)
    backbone = model.backbone
    assert isinstance(backbone, LegoResNet)
    assert backbone.tasks == [cfg.gppf_task]
    # The new task takes its source task's route and norm statistics.
    row = gppf_ckpt['tasks'].index(cfg.gppf_source)
    state, ours = gppf_ckpt['state'], backbone.state_dict()
    torch.testing.assert_close(ours['router.logits'][0],
                               state['router.logits'][row])
    for key in ('bn1.running_mean', 'layer3.2.bn2.running_mean'):
        torch.testing.assert_close(ours[key], state[key][row])
    torch.testing.assert_close(ours['layer4.0.conv2.weight.5'],
                               state['layer4.0.conv2.weight.5'])
    if path.stem in _ONE_PER_LIBRARY:
        _train_step(model, cfg)


@pytest.mark.parametrize('script,args', [
    ('slurm_train.sh', 'PARTITION JOB_NAME CONFIG WORK_DIR'),
    ('slurm_test.sh', 'PARTITION JOB_NAME CONFIG CHECKPOINT'),
])
def test_slurm_scripts_print_usage(script, args):
    proc = subprocess.run(['bash', str(ROOT / 'tools' / script)],
                          capture_output=True,
                          text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert 'usage:' in proc.stderr and args in proc.stderr
