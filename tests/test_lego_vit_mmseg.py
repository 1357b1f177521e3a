"""LegoViT in mmseg: the UPerNet ViT-B config, a drop-in for mmseg's ViT.

The stock config's backbone arguments, shrunk to a tiny arch (64 wide, 4
layers, 64x64 crops), build the segmentor through mmseg's registry; the
LegoViT loaded with a stock mmseg ``VisionTransformer``'s weights (through
the config's own ``pretrained`` field) computes what that ViT computes.
"""
import copy
import os.path as osp
from pathlib import Path

import mmseg
import pytest
import torch
from _float64 import assert_close_to_scale
from _lego_common import load_tool
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope
from mmengine.structures import PixelData
from mmseg.models.backbones import VisionTransformer
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from projects.gppf import LegoViT, use_task
from projects.gppf.models.lego.vit_convert import (mmpretrain_to_mmseg,
                                                   mmseg_to_mmpretrain)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'configs' / 'lego_vit' / (
    'upernet_vit-b16-lego_mln_8xb2-160k_ade20k-512x512.py')
STOCK = osp.join(
    osp.dirname(mmseg.__file__), '.mim', 'configs', 'vit',
    'vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.py')
WIDTH, SIZE = 64, 64
TINY = dict(
    img_size=(SIZE, SIZE),
    embed_dims=WIDTH,
    num_layers=4,
    num_heads=4,
    out_indices=(0, 1, 2, 3))


@pytest.fixture(autouse=True)
def _mmseg_scope():
    """The config's ``default_scope`` (conftest drops the instance)."""
    DefaultScope.get_instance('test_lego_vit_mmseg', scope_name='mmseg')
    with DefaultScope.overwrite_default_scope('mmseg'):
        yield


def _tiny_model_cfg(pretrained=None):
    """The config's model with the tiny arch and 64x64 crops."""
    model = Config.fromfile(str(CONFIG)).model  # a ConfigDict, as mmseg
    model['backbone'].update(TINY)
    model['neck'].update(in_channels=[WIDTH] * 4, out_channels=WIDTH)
    model['decode_head'].update(in_channels=[WIDTH] * 4, channels=32)
    model['auxiliary_head'].update(in_channels=WIDTH, channels=16)
    model['data_preprocessor'].update(size=(SIZE, SIZE))
    model['pretrained'] = pretrained
    return model


def _stock_vit() -> VisionTransformer:
    """mmseg's ViT with the config's arguments (tiny arch), float64, with
    non-trivial weights everywhere (LayerNorm weights around 1)."""
    args = dict(_tiny_model_cfg()['backbone'])
    args.pop('type')
    torch.manual_seed(0)
    model = VisionTransformer(**args)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shift = 1.0 if 'ln' in name and name.endswith('weight') else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + shift)
    return model.double()


def test_config_swaps_only_the_backbone_type():
    cfg, stock = Config.fromfile(str(CONFIG)), Config.fromfile(STOCK)
    assert cfg.custom_imports.imports == ['projects.gppf']
    assert cfg.find_unused_parameters is True
    assert cfg.model.backbone.type == 'LegoViT'
    assert stock.model.backbone.type == 'VisionTransformer'
    assert dict(cfg.model.backbone, type='VisionTransformer') == \
        stock.model.backbone
    # ``mmseg::`` inheritance adds ``_scope_='mmseg'``; nothing else differs.
    assert dict(cfg.model, backbone=None, _scope_='mmseg') == \
        dict(stock.model, backbone=None, _scope_='mmseg')
    assert cfg.model.pretrained == 'pretrain/vit_base_patch16_224.pth'
    # Every stock backbone argument is accepted (full ViT-B, no weights).
    args = dict(cfg.model.backbone)
    args.pop('type')
    lego = LegoViT(**args)
    assert lego.arch_settings == dict(
        embed_dims=768, num_layers=12, num_heads=12, feedforward_channels=3072)
    assert lego.out_type == 'featmap' and not lego.final_norm
    assert lego.patch_embed.projection.bias is None  # as mmseg's


def test_tiny_model_builds_and_outputs_like_mmseg_vit():
    model = MODELS.build(_tiny_model_cfg())
    model.init_weights()
    assert isinstance(model.backbone, LegoViT)
    stock = _stock_vit().float()
    assert model.backbone.out_channels == (WIDTH, ) * 4
    x = torch.randn(2, 3, SIZE, SIZE)
    got, want = model.backbone(x), stock(x)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert a.shape == b.shape == (2, WIDTH, SIZE // 16, SIZE // 16)
        assert a.dtype == b.dtype == torch.float32
    logits = model(x, mode='tensor')
    assert logits.shape == (2, 150, SIZE // 4, SIZE // 4)


@pytest.mark.parametrize('route', [[0, 1], [1, 2]])
def test_loaded_from_mmseg_vit_weights_equals_it(tmp_path, route):
    """k=2 of N=4, equal gates: LegoViT inflated from a stock mmseg ViT's
    state dict (mmseg key names, through the config's model-level
    ``pretrained``) gives the same outputs and input gradient in float64
    (route [1, 2] permutes the head groups and hidden slices)."""
    stock = _stock_vit()
    path = tmp_path / 'mmseg_vit.pth'
    torch.save({'state_dict': stock.state_dict()}, path)
    model = MODELS.build(_tiny_model_cfg(str(path)))
    assert model.backbone.init_cfg == dict(
        type='Pretrained', checkpoint=str(path))
    model.init_weights()
    lego = model.backbone.double()
    assert (lego.num_legos, lego.num_active) == (4, 2)
    lego.router.logits.data.zero_()
    lego.router.set_route('default',
                          torch.tensor([route] * lego.router.num_layers))
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    grads = []
    for net in (lego, stock):
        xi = x.clone().requires_grad_(True)
        outs = net(xi)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o).double()).sum()
            for o in outs).backward()
        grads.append((outs, xi.grad))
    (got, got_dx), (want, want_dx) = grads
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape
        assert_close_to_scale(a, b, f'output {i}')
    assert_close_to_scale(got_dx, want_dx, 'input gradient')
    # Another input size: both interpolate the position embedding, but
    # mmpretrain's ``resize_pos_embed`` (LegoViT) runs bicubic in float32.
    x = torch.randn(1, 3, 96, 48, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(lego(x), stock(x)):
            assert a.shape == b.shape == (1, WIDTH, 6, 3)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_train_step_on_two_synthetic_images():
    model = MODELS.build(_tiny_model_cfg())
    model.init_weights()
    model.train()
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(2):
        sample = SegDataSample(
            metainfo=dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, 150, (1, SIZE, SIZE), generator=gen))
        samples.append(sample)
    data = dict(
        inputs=[
            torch.randint(
                0, 256, (3, SIZE, SIZE), generator=gen, dtype=torch.uint8)
            for _ in samples
        ],
        data_samples=samples)
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    before = copy.deepcopy(model.backbone.state_dict())
    log_vars = model.train_step(data, optim)
    losses = {k: float(v) for k, v in log_vars.items() if 'loss' in k}
    assert set(losses) == {'loss', 'decode.loss_ce', 'aux.loss_ce'}
    for key, value in losses.items():
        assert torch.isfinite(torch.tensor(value)) and value > 0, key
    after = model.backbone.state_dict()
    qkv = 'layers.0.attn.qkv.weight.'
    moved = {
        u
        for u in range(4)
        if not torch.equal(after[qkv + str(u)], before[qkv + str(u)])
    }
    assert len(moved) == 2  # the route's units only


def _export_to_mmseg(tmp_path, lego: LegoViT, **kwargs):
    """``lego2vit.py --to mmseg`` of ``lego`` (float64, random route logits,
    saved as a whole model) for task ``'seg'``: (the exported state dict,
    its meta)."""
    tool = load_tool('model_converters/lego2vit.py')
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in lego.named_parameters():
            shift = 1.0 if 'ln' in name and name.endswith('weight') else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + shift)
    lego.double().eval()
    src, out = tmp_path / 'gppf.pth', tmp_path / 'seg_mmseg_vit.pth'
    torch.save(
        {
            'state_dict': {
                f'backbone.{k}': v
                for k, v in lego.state_dict().items()
            }
        }, src)
    meta = tool.convert(str(src), 'seg', str(out), to='mmseg', **kwargs)
    saved = torch.load(out, map_location='cpu')
    assert saved['meta'] == meta and meta['stock_format'] == 'mmseg'
    assert meta['gppf_route'] == lego.router.greedy_indices('seg').tolist()
    return saved['state_dict'], meta


def _check_stock_mmseg_vit_computes_seg(lego, state, meta, out_indices):
    """mmseg's ViT of the meta's arguments loads ``state`` strictly and
    computes ``lego``'s ``'seg'`` outputs in float64."""
    stock = VisionTransformer(
        **dict(meta['stock_backbone'], out_indices=out_indices)).double()
    result = stock.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    stock.eval()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad(), use_task('seg'):
        want = lego(x)
    got = stock(x)
    assert len(got) == len(want) == len(out_indices)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == torch.float64
        assert_close_to_scale(a, b, f'output {i}')


def test_lego2vit_to_mmseg_loads_strictly_into_mmseg_vit(tmp_path):
    """A LegoViT built with mmseg's arguments (no patch bias), exported
    with ``--to mmseg``: bare mmseg key names that mmseg's ViT loads with
    ``strict=True`` and through its own ``pretrained`` field, computing the
    task's outputs to 1e-10 of scale in float64."""
    args = dict(_tiny_model_cfg()['backbone'])
    args.pop('type')
    lego = LegoViT(**args, tasks=('seg', 'cls'))
    state, meta = _export_to_mmseg(tmp_path, lego)
    assert 'layers.0.attn.attn.in_proj_weight' in state
    assert 'layers.0.attn.attn.out_proj.weight' in state
    assert 'patch_embed.projection.bias' not in state
    assert not any(k.startswith('backbone.') for k in state)
    assert all(v.dtype == torch.float64 for v in state.values())
    assert meta['stock_backbone']['patch_bias'] is False
    assert meta['stock_backbone']['norm_cfg'] == dict(type='LN', eps=1e-6)
    _check_stock_mmseg_vit_computes_seg(lego, state, meta, (0, 1, 2, 3))
    # mmseg's own loading path (non-strict, no prefix) takes every tensor.
    stock = VisionTransformer(
        **meta['stock_backbone'],
        pretrained=str(tmp_path / 'seg_mmseg_vit.pth')).double()
    stock.init_weights()
    for key, value in stock.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_lego2vit_to_mmseg_refuses_a_patch_bias_unless_asked(tmp_path):
    """A LegoViT built with mmpretrain arguments has a patch bias: refused
    with a message naming ``patch_bias=True``; with ``patch_bias=True`` the
    export loads into ``VisionTransformer(patch_bias=True)`` and computes
    the task's outputs (final norm included)."""
    arch = dict(
        embed_dims=WIDTH, num_layers=2, num_heads=4, feedforward_channels=128)
    lego = LegoViT(
        arch,
        tasks=('seg', 'cls'),
        img_size=SIZE,
        out_type='featmap',
        out_indices=(0, 1))
    assert lego.patch_embed.projection.bias is not None
    with pytest.raises(ValueError, match=r'patch_bias=True'):
        _export_to_mmseg(tmp_path, lego)
    state, meta = _export_to_mmseg(tmp_path, lego, patch_bias=True)
    assert 'patch_embed.projection.bias' in state
    assert meta['stock_backbone']['patch_bias'] is True
    assert meta['stock_backbone']['final_norm'] is True
    assert meta['stock_backbone']['mlp_ratio'] == 2
    _check_stock_mmseg_vit_computes_seg(lego, state, meta, (0, 1))


def test_mmseg_mmpretrain_renames_round_trip():
    """mmseg -> mmpretrain -> mmseg of a stock mmseg ViT state dict (pre-
    and final norm) is the identity on keys (in order) and values, and the
    renamed keys are a stock mmpretrain ViT's; the other way round too."""
    from mmpretrain.models import VisionTransformer as MMPretrainViT
    kw = dict(img_size=SIZE, pre_norm=True, final_norm=True)
    seg = VisionTransformer(
        embed_dims=WIDTH, num_layers=2, num_heads=4, mlp_ratio=2,
        **kw).state_dict()
    pre = MMPretrainViT(
        dict(
            embed_dims=WIDTH,
            num_layers=2,
            num_heads=4,
            feedforward_channels=128),
        out_type='featmap',
        **kw).state_dict()
    renamed = mmseg_to_mmpretrain(seg)
    assert set(renamed) == set(pre) and 'pre_norm.weight' in renamed
    back = mmpretrain_to_mmseg(renamed)
    assert list(back) == list(seg) and 'ln_pre.weight' in back
    assert all(back[k] is seg[k] for k in seg)
    assert set(mmpretrain_to_mmseg(pre)) == set(seg)
    there = mmseg_to_mmpretrain(mmpretrain_to_mmseg(pre))
    assert list(there) == list(pre)
    assert all(there[k] is pre[k] for k in pre)
    assert mmpretrain_to_mmseg(seg) is seg  # already mmseg's names
