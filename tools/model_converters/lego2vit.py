"""Extract a task's sub-network of a LegoViT as a stock ViT checkpoint.

The task's noise-free (or frozen) route picks k units per lego layer (head
groups, MLP hidden slices); their slices are gathered into dense tensors with
the stock ``VisionTransformer`` key names and shapes, the task's gates folded
into the attention output projection and the second MLP linear.

``--to mmpretrain`` (default) writes mmpretrain's key names under
``backbone.``; the output loads with no missing or unexpected key into

    backbone=dict(type='VisionTransformer', arch=..., ...,  # printed here
                  init_cfg=dict(type='Pretrained', prefix='backbone.',
                                checkpoint='OUT.pth'))

``--to mmseg`` writes mmseg's key names (``attn.attn.in_proj_*``,
``attn.attn.out_proj``, ``ln_pre``) without a prefix, as mmseg's
``vit2mmseg.py`` does: mmseg's ViT loads ``pretrained`` non-strictly and
ignores a ``prefix``. The tool checks that the output loads strictly into
``mmseg.VisionTransformer(**meta['stock_backbone'])`` (printed here), so

    model = dict(pretrained='OUT.pth', backbone=dict(
        type='VisionTransformer', ...))  # the printed arguments

loads every tensor. mmseg's ViT has no patch-embedding bias by default; a
LegoViT built with mmpretrain arguments has one, which is refused unless
``--patch-bias`` is given (then set ``patch_bias=True`` in the mmseg config).

Usage:
    python tools/model_converters/lego2vit.py CKPT TASK OUT.pth \
        [--prefix backbone.] [--to {mmpretrain,mmseg}] [--patch-bias]
"""
import argparse
import os.path as osp
import sys
from typing import Dict

import torch

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from _lego_export import lego_extra_state, main, save_export  # noqa: E402

from projects.gppf.models import LegoViT, lego  # noqa: E402

FORMATS = ('mmpretrain', 'mmseg')


def convert(checkpoint: str,
            task: str,
            out: str,
            prefix: str = 'backbone.',
            to: str = 'mmpretrain',
            patch_bias: bool = False) -> dict:
    """Write ``task``'s sub-network of ``checkpoint`` to ``out`` with the
    key names of ``to``'s ``VisionTransformer``; returns the metadata saved
    with it (route, gates, stock backbone arguments, ``stock_format``).
    The export is float64 if ``checkpoint`` is, else float32.

    Raises:
        ValueError: ``to='mmseg'`` and the sub-network does not load strictly
            into mmseg's ViT (a patch bias without ``patch_bias``, a layer
            scale, an ``avg_featmap`` norm, an MLP ratio that is no integer).
    """
    if to not in FORMATS:
        raise ValueError(f'to must be one of {FORMATS}, got {to!r}')
    state = lego.read_vit_state_dict(checkpoint, prefix)
    extra = lego_extra_state(state, checkpoint, prefix, 'LegoViT', task)
    layout = extra['lego_layout']
    arch = {
        k: layout[k]
        for k in ('embed_dims', 'num_layers', 'num_heads',
                  'feedforward_channels')
    }
    backbone = LegoViT(
        arch,
        num_legos=layout['num_legos'],
        num_active=layout['num_active'],
        tasks=layout['tasks'],
        **extra['vit_args'])
    if state['pos_embed'].dtype == torch.float64:
        backbone.double()  # a float64 checkpoint's export stays float64
    backbone.load_state_dict(state, strict=True)
    dense = lego.extract_vit_task_state_dict(backbone, task)
    if to == 'mmpretrain':
        return save_export(
            backbone,
            task,
            checkpoint,
            out,
            dense,
            backbone.stock_args(),
            stock_format=to)
    dense = lego.vit_convert.mmpretrain_to_mmseg(dense)
    args = mmseg_vit_args(backbone, patch_bias)
    _check_loads_into_mmseg(dense, args)
    return save_export(
        backbone,
        task,
        checkpoint,
        out,
        dense,
        args,
        key_prefix='',
        stock_format=to)


def mmseg_vit_args(backbone: LegoViT, patch_bias: bool = False) -> dict:
    """Arguments of an mmseg ``VisionTransformer`` whose tensors are those
    of ``backbone`` (add ``out_indices``, ``drop_path_rate`` and the like).

    Raises:
        ValueError: the patch embedding's bias disagrees with
            ``patch_bias``, or ``feedforward_channels`` is no multiple of
            ``embed_dims`` (mmseg's ViT takes an ``mlp_ratio``).
    """
    stock = backbone.stock_args()
    arch = stock['arch']
    ratio, rest = divmod(arch['feedforward_channels'], arch['embed_dims'])
    if rest:
        raise ValueError(
            f'mmseg\'s VisionTransformer takes mlp_ratio * embed_dims hidden '
            f'channels; feedforward_channels={arch["feedforward_channels"]} '
            f'is no multiple of embed_dims={arch["embed_dims"]}')
    has_bias = backbone.patch_embed.projection.bias is not None
    if has_bias and not patch_bias:
        raise ValueError(
            'the LegoViT\'s patch embedding has a bias (it was built with '
            'mmpretrain arguments), which mmseg\'s VisionTransformer holds '
            'only with patch_bias=True (its default, False, would leave the '
            'bias out of a non-strict load silently): pass --patch-bias '
            '(patch_bias=True) and set patch_bias=True in the mmseg backbone '
            'config')
    if patch_bias and not has_bias:
        raise ValueError(
            '--patch-bias given, but the LegoViT\'s patch embedding has no '
            'bias: an mmseg ViT with patch_bias=True would keep a random one')
    norm = next(m for m in backbone.modules()
                if isinstance(m, torch.nn.LayerNorm))
    return dict(
        img_size=tuple(stock['img_size']),
        patch_size=stock['patch_size'],
        in_channels=stock['in_channels'],
        embed_dims=arch['embed_dims'],
        num_layers=arch['num_layers'],
        num_heads=arch['num_heads'],
        mlp_ratio=ratio,
        qkv_bias=stock['qkv_bias'],
        with_cls_token=stock['with_cls_token'],
        norm_cfg=dict(type='LN', eps=norm.eps),
        patch_norm=backbone.patch_embed.norm is not None,
        patch_bias=has_bias,
        pre_norm=stock['pre_norm'],
        final_norm=stock['final_norm'],
        interpolate_mode=backbone.interpolate_mode)


def _check_loads_into_mmseg(dense: Dict[str, torch.Tensor],
                            args: dict) -> None:
    """Raise a ``ValueError`` naming every key or shape by which ``dense``
    and ``mmseg.VisionTransformer(**args)`` differ."""
    from mmseg.models.backbones import VisionTransformer
    want = {
        k: tuple(v.shape)
        for k, v in VisionTransformer(**args).state_dict().items()
    }
    got = {k: tuple(v.shape) for k, v in dense.items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = sorted(f'{k}: {got[k]} vs {want[k]}' for k in set(got) & set(want)
                    if got[k] != want[k])
    if missing or unexpected or shapes:
        raise ValueError(
            'the sub-network does not load strictly into mmseg\'s '
            f'VisionTransformer(**{args}): missing {missing}, unexpected '
            f'{unexpected} (an mmpretrain-only layer scale or avg_featmap '
            f'norm has no mmseg counterpart), shapes {shapes}')


def _summary(meta: dict) -> str:
    scope = 'mmseg.' if meta.get('stock_format') == 'mmseg' else ''
    return (f"; stock backbone: dict(type='{scope}VisionTransformer', "
            f"**{meta['stock_backbone']})")


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--to',
        choices=FORMATS,
        default='mmpretrain',
        help='key names of whose VisionTransformer to write (mmseg: no '
        'prefix, for its backbone\'s pretrained / init_cfg)')
    parser.add_argument(
        '--patch-bias',
        action='store_true',
        help='with --to mmseg: write the patch embedding\'s bias (the mmseg '
        'config then needs patch_bias=True)')


if __name__ == '__main__':
    main(__doc__, 'LegoViT', convert, _summary, _add_args)
