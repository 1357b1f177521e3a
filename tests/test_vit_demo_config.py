"""The LegoViT demo config: it loads, builds one GPPF with three tasks on one
ViT-Tiny-size LegoViT, and one SIMT iteration on drawn images in the demo
data's layout gives finite losses for every task."""
import math
from pathlib import Path

import pytest
import torch
from _simt_common import REPO, TASKS, make_synthetic_data
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import Runner
from mmpretrain.models.backbones import VisionTransformer

import projects.gppf.engine  # noqa: F401  (registers the loops)
from projects.gppf.models import use_task

VIT_DEMO = (
    REPO / 'configs' / 'gppf' / 'gppf_lego-vit-t_1xb8-8-32-400_gppf-demo.py')
R18_DEMO = (
    REPO / 'configs' / 'gppf' / 'gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py')


@pytest.fixture(scope='module')
def cfg() -> Config:
    return Config.fromfile(str(VIT_DEMO))


def test_config_inherits_the_r18_demo(cfg):
    r18 = Config.fromfile(str(R18_DEMO))
    assert list(cfg.model.tasks) == list(TASKS)
    for key in ('train_dataloader', 'val_dataloader', 'val_evaluator'):
        assert cfg[key].to_dict() == r18[key].to_dict(), key
    assert cfg.model.backbone.type == 'LegoViT'
    assert 'depth' not in cfg.model.backbone  # the ResNet's keys are gone
    assert cfg.model.tasks.mnist_det.neck.type == 'SimpleFPN'
    # Everything that depends on the schedule follows max_iters.
    iters = cfg.train_cfg.max_iters
    assert cfg.param_scheduler[-1].end == iters
    assert cfg.default_hooks.checkpoint.interval == iters
    assert cfg.custom_hooks[0].freeze_iter == iters * 3 // 4


def _batches(cfg: Config, root: Path) -> dict:
    """One training batch per task (2 images) of the config's datasets and
    pipelines, read from ``root``."""
    out = {}
    for task, loader in Config(cfg.to_dict()).train_dataloader.items():
        loader.batch_size = 2
        dataset = loader.dataset
        dataset.data_root = dataset.data_root.replace(cfg.data_root,
                                                      f'{root}/')
        dataset.serialize_data = False
        out[task] = next(iter(Runner.build_dataloader(loader, seed=0)))
    return out


def test_one_simt_iteration_on_drawn_images(cfg, tmp_path):
    root = make_synthetic_data(tmp_path, num_train=4, num_val=2)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model)
        model.init_weights()
        wrapper = build_optim_wrapper(model, cfg.optim_wrapper)

    # One ViT-Tiny-size LegoViT shared by the three stock task models; a
    # task's route (k of N units) is exactly a stock ViT-Tiny.
    backbone = model.backbone
    assert type(backbone).__name__ == 'LegoViT'
    assert model.task_names == list(TASKS)
    assert all(model.tasks[t].backbone is backbone for t in TASKS)
    assert sorted(backbone.tasks) == sorted(TASKS)
    assert backbone.arch_settings == VisionTransformer.arch_zoo['deit-tiny']
    assert backbone.arch_settings['num_heads'] % backbone.num_active == 0
    assert not any(
        k.startswith('tasks.') and '.backbone.' in k
        for k in model.state_dict())

    # The pyramid's strides are the detection head's.
    det = model.tasks['mnist_det']
    with torch.no_grad(), use_task('mnist_det'):
        feats = det.extract_feat(torch.zeros(1, 3, 128, 128))
    assert [tuple(f.shape[2:]) for f in feats
            ] == [(128 // s, 128 // s) for s in det.bbox_head.strides]

    log_vars = model.train().train_step(_batches(cfg, root), wrapper)
    for key in ('mnist_det/loss_cls', 'mnist_det/loss_bbox',
                'mnist_det/loss_centerness', 'fmnist_seg/decode.loss_ce',
                'fmnist_cls/loss', 'loss'):
        assert math.isfinite(float(log_vars[key])), key
    for task in TASKS:
        assert log_vars[f'{task}/skipped'] == 0, task
    # The step moved the shared backbone and every task's head.
    state = wrapper.optimizer.state
    heads = ('bbox_head.conv_cls.weight', 'decode_head.conv_seg.weight',
             'head.fc.weight')
    for name in ('backbone.pos_embed',
                 'backbone.patch_embed.projection.weight',
                 *(f'tasks.{t}.{h}' for t, h in zip(TASKS, heads))):
        assert state[model.get_parameter(name)], name
