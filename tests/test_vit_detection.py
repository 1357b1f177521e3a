"""ViT detection pieces: ``LN2d``, ``SimpleFPN``, the LegoViT Mask R-CNN
config and the GPPF-ViT-B pre-training config.

The configs are the real ones with the backbone shrunk to a 2-layer,
64-channel LegoViT on 64x64 inputs (and the necks and heads that read its
channels shrunk to match); the data samples come from the downstream config
tests' helpers (``mmdet.testing.demo_mm_inputs`` and friends).
"""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import OptimWrapper
from mmengine.registry import MODELS, DefaultScope
from test_downstream_configs import _batch, _build

import projects.gppf  # noqa: F401  (registers LegoViT, LN2d, SimpleFPN)
from projects.gppf.models import GPPF, LegoViT, SimpleFPN
from projects.gppf.models.layers import LN2d

ROOT = Path(__file__).resolve().parents[1]
MASK_RCNN = (
    ROOT / 'configs' / 'lego_vit' /
    'mask-rcnn_vit-b-lego_simple-fpn_lsj-100e_coco.py')
GPPF_VIT = (
    ROOT / 'configs' / 'gppf' /
    'gppf_lego-vit-b_8xb2-2-32-90k_coco-ade20k-in1k.py')
C = 64  # tiny ViT width
TINY_ARCH = dict(
    embed_dims=C, num_layers=2, num_heads=4, feedforward_channels=128)
NECK = dict(backbone_channel=C, in_channels=[C // 4, C // 2, C, C])


def _fpn(**kwargs) -> SimpleFPN:
    from mmdet.registry import MODELS as DET
    cfg = dict(
        type='SimpleFPN',
        out_channels=32,
        num_outs=5,
        norm_cfg=dict(type='LN2d'),
        **NECK)
    cfg.update(kwargs)
    with DefaultScope.overwrite_default_scope('mmdet'):
        return DET.build(cfg)


# ---------------------------------------------------------------- LN2d
@pytest.mark.parametrize('scope', ['mmdet', 'mmseg', 'mmpretrain'])
def test_ln2d_equals_permuted_layernorm(scope):
    import importlib
    importlib.import_module(f'{scope}.registry')
    with DefaultScope.overwrite_default_scope(scope):
        name, norm = build_norm_layer(dict(type='LN2d', eps=1e-6), 6)
    assert isinstance(norm, LN2d) and name == 'ln'
    torch.manual_seed(0)
    ref = nn.LayerNorm(6, eps=1e-6).double()
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    norm.double().load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    expected = ref(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


def test_ln2d_registered_in_root_as_mmpretrain_class():
    from mmpretrain.models.utils.norm import LayerNorm2d
    assert MODELS.module_dict['LN2d'] is LN2d is LayerNorm2d


# ----------------------------------------------------------- SimpleFPN
def test_simple_fpn_shapes_and_strides():
    torch.manual_seed(0)
    fpn = _fpn()
    x = torch.randn(2, C, 4, 4)  # a 64x64 image through patch 16
    outs = fpn(x)
    # strides 4, 8, 16, 32, 64 of the image: 16, 8, 4, 2, 1 cells
    assert [tuple(o.shape) for o in outs] == [(2, 32, s, s)
                                              for s in (16, 8, 4, 2, 1)]
    # The backbone's tuple: the last map is used.
    other = torch.randn(2, C, 4, 4)
    for a, b in zip(fpn((other, x)), outs):
        torch.testing.assert_close(a, b)
    # Not square, not a multiple of 2: the pool rounds down.
    sizes = [tuple(o.shape[-2:]) for o in fpn(torch.randn(1, C, 3, 5))]
    assert sizes == [(12, 20), (6, 10), (3, 5), (1, 2), (1, 1)]


def test_simple_fpn_errors():
    branches = r'builds branches of \[16, 32, 64, 64\] channels'
    with pytest.raises(ValueError, match=branches):
        _fpn(in_channels=[64, 64, 64, 64])
    with pytest.raises(ValueError, match='num_outs must be >= 4, got 3'):
        _fpn(num_outs=3)
    with pytest.raises(ValueError, match=r'expects a \(B, 64, H, W\) map'):
        _fpn()(torch.randn(1, 32, 4, 4))


# ------------------------------------------------- Mask R-CNN config
def _tiny_mask_rcnn() -> Config:
    """The config with a tiny backbone and 32-channel neck and heads."""
    cfg = Config.fromfile(str(MASK_RCNN))
    model = cfg.model
    model.backbone.update(arch=TINY_ARCH, img_size=64)
    model.neck.update(NECK, out_channels=32)
    model.rpn_head.update(in_channels=32, feat_channels=32)
    roi = model.roi_head
    roi.bbox_roi_extractor.out_channels = 32
    roi.mask_roi_extractor.out_channels = 32
    roi.bbox_head.update(
        in_channels=32, conv_out_channels=32, fc_out_channels=64)
    roi.mask_head.update(in_channels=32, conv_out_channels=32)
    model.train_cfg.rcnn.sampler.num = 64
    return cfg


def test_mask_rcnn_config():
    cfg = Config.fromfile(str(MASK_RCNN))
    assert cfg.default_scope == 'mmdet'
    assert cfg.find_unused_parameters is True
    backbone = cfg.model.backbone
    assert backbone.type == 'LegoViT' and backbone.arch == 'base'
    assert (backbone.patch_size, backbone.img_size) == (16, 1024)
    assert backbone.out_type == 'featmap' and backbone.final_norm is False
    assert cfg.model.neck.type == 'SimpleFPN'
    assert cfg.model.neck.norm_cfg.type == 'LN2d'
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'


def test_mask_rcnn_config_trains_one_step():
    cfg = _tiny_mask_rcnn()
    model = _build(cfg)
    assert isinstance(model.backbone, LegoViT)
    assert isinstance(model.neck, SimpleFPN)
    assert isinstance(model.neck.lateral_convs[0].norm, LN2d)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # SGD without momentum or weight decay: a parameter moves iff it got a
    # non-zero gradient.
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with DefaultScope.overwrite_default_scope('mmdet'):
        log_vars = model.train_step(_batch(cfg, 'mmdet'), wrapper)
    for key in ('loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox',
                'loss_mask'):
        value = float(log_vars[key])
        assert torch.isfinite(torch.tensor(value)) and value > 0, key
    moved = {
        n
        for n, p in model.named_parameters()
        if not torch.equal(p.detach(), before[n])
    }
    for name in ('backbone.patch_embed.projection.weight',
                 'backbone.pos_embed', 'backbone.layers.0.ln1.weight',
                 'backbone.layers.1.ffn.fc2.bias', 'neck.branches.0.0.weight',
                 'neck.branches.0.1.weight', 'neck.branches.1.0.weight',
                 'neck.lateral_convs.0.conv.weight',
                 'neck.lateral_convs.3.conv.weight',
                 'neck.fpn_convs.2.conv.weight'):
        assert name in before, name
        assert name in moved, name


# ------------------------------------------------ GPPF-ViT-B config
def _tiny_gppf() -> Config:
    cfg = Config.fromfile(str(GPPF_VIT))
    tasks = cfg.model.tasks
    cfg.model.backbone.update(
        arch=dict(TINY_ARCH, num_layers=4),
        img_size=64,
        out_indices=(0, 1, 2, 3))
    det = tasks.coco_det
    det.neck.update(NECK, out_channels=32)
    det.rpn_head.update(in_channels=32, feat_channels=32)
    det.roi_head.bbox_roi_extractor.out_channels = 32
    det.roi_head.bbox_head.update(
        in_channels=32, conv_out_channels=32, fc_out_channels=64)
    det.train_cfg.rcnn.sampler.num = 64
    seg = tasks.ade20k_seg
    seg.neck.update(in_channels=[C] * 4, out_channels=C)
    seg.decode_head.update(in_channels=[C] * 4, channels=16)
    seg.auxiliary_head.update(in_channels=C, channels=16)
    seg.data_preprocessor.size = (64, 64)
    tasks.in1k_cls.head.in_channels = C
    return cfg


def test_gppf_vit_config():
    cfg = Config.fromfile(str(GPPF_VIT))
    assert list(cfg.model.tasks) == ['coco_det', 'ade20k_seg', 'in1k_cls']
    backbone = cfg.model.backbone
    assert backbone.type == 'LegoViT' and backbone.arch == 'base'
    assert tuple(backbone.out_indices) == (2, 5, 8, 11)
    assert cfg.model.tasks.coco_det.type == 'FasterRCNN'  # as the R50 mix
    assert cfg.model.tasks.coco_det.neck.type == 'SimpleFPN'
    assert cfg.model.tasks.ade20k_seg.neck.type == 'MultiLevelNeck'
    assert cfg.train_cfg.type == 'SIMTTrainLoop'
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    assert 'momentum' not in cfg.optim_wrapper.optimizer


def test_gppf_vit_config_builds_and_runs_each_task():
    cfg = _tiny_gppf()
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model)
        model.init_weights()
    model = revert_sync_batchnorm(model)
    assert isinstance(model, GPPF)
    assert model.task_names == ['coco_det', 'ade20k_seg', 'in1k_cls']
    assert model.task_scopes == dict(
        coco_det='mmdet', ade20k_seg='mmseg', in1k_cls='mmpretrain')
    assert isinstance(model.backbone, LegoViT)
    assert sorted(model.backbone.tasks) == sorted(model.task_names)
    det = model.tasks['coco_det']
    assert isinstance(det.neck, SimpleFPN) and det.backbone is model.backbone
    assert type(model.tasks['ade20k_seg'].neck).__name__ == 'MultiLevelNeck'
    assert type(model.tasks['in1k_cls'].head).__name__ == \
        'VisionTransformerClsHead'
    # Every task takes the shared backbone's outputs: one loss each.
    model.train()
    det_cfg = Config(dict(model=dict(type='FasterRCNN')))
    for task, scope in model.task_scopes.items():
        batch = _batch(det_cfg, scope)
        data = model.data_preprocessor(copy.deepcopy(batch), True, task=task)
        losses = model.loss(task, data['inputs'], data['data_samples'])
        loss, _ = model.task_loss(task, losses)
        assert torch.isfinite(loss) and loss > 0, task
