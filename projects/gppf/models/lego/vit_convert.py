"""Moving weights between dense ViTs and LegoViT.

- :func:`load_vit_dense_or_lego` inflates a dense ViT state dict
  (mmpretrain ``VisionTransformer`` keys, or timm / MAE keys and mmseg
  ``VisionTransformer`` keys, which :func:`timm_to_mmpretrain` and
  :func:`mmseg_to_mmpretrain` rename) into the lego units: unit ``i`` of a
  lego layer copies the dense slice ``i mod k`` (head group or MLP hidden
  slice), so a route whose units cover every slice once reproduces the dense
  network. A LegoViT state dict loads as is after its lego layout is checked
  (``LegoViT.set_extra_state``). :func:`mmpretrain_to_mmseg` is the inverse
  of :func:`mmseg_to_mmpretrain` (for exports to mmseg's ViT).
- :func:`extract_vit_task_state_dict` gathers one task's units (its
  noise-free or frozen route) into a state dict with the stock
  ``VisionTransformer`` keys and shapes, the task's gates folded into the
  ``proj`` / ``fc2`` columns: a stock ViT of ``LegoViT.stock_args()`` loads it
  with ``strict=True`` and computes what the LegoViT computes for the task.
"""
import re
from typing import TYPE_CHECKING, Dict, Iterator, Mapping, Optional, Tuple

import torch

from .backbone_state import log_key_mismatch, read_backbone_state
from .layers import inflate_slots
from .linear_units import LegoLinear
from .packed_state import unpack_state
from .task_remap import check_lego_source, remap_tasks

if TYPE_CHECKING:
    from ..backbones.lego_vit import LegoViT

__all__ = [
    'read_vit_state_dict', 'timm_to_mmpretrain', 'mmseg_to_mmpretrain',
    'mmpretrain_to_mmseg', 'vit_lego_linears', 'load_vit_dense_or_lego',
    'extract_vit_task_state_dict'
]

_TIMM_RENAMES = (
    (r'^patch_embed\.proj\.', 'patch_embed.projection.'),
    (r'^blocks\.(\d+)\.norm1\.', r'layers.\1.ln1.'),
    (r'^blocks\.(\d+)\.norm2\.', r'layers.\1.ln2.'),
    (r'^blocks\.(\d+)\.mlp\.fc1\.', r'layers.\1.ffn.layers.0.0.'),
    (r'^blocks\.(\d+)\.mlp\.fc2\.', r'layers.\1.ffn.layers.1.'),
    (r'^blocks\.(\d+)\.ls1\.gamma$', r'layers.\1.attn.gamma1.weight'),
    (r'^blocks\.(\d+)\.ls2\.gamma$', r'layers.\1.ffn.gamma2.weight'),
    (r'^blocks\.(\d+)\.attn\.', r'layers.\1.attn.'),
    (r'^norm\.', 'ln1.'),
    (r'^fc_norm\.', 'ln2.'),
)
# mmseg's layers wrap ``nn.MultiheadAttention`` (fused q, k, v rows in the
# same order as mmpretrain's ``qkv``); its pre-norm is ``ln_pre``.
_MMSEG_RENAMES = (
    (r'\.attn\.attn\.in_proj_weight$', '.attn.qkv.weight'),
    (r'\.attn\.attn\.in_proj_bias$', '.attn.qkv.bias'),
    (r'\.attn\.attn\.out_proj\.', '.attn.proj.'),
    (r'^ln_pre\.', 'pre_norm.'),
)
_MMPRETRAIN_TO_MMSEG = (
    (r'\.attn\.qkv\.weight$', '.attn.attn.in_proj_weight'),
    (r'\.attn\.qkv\.bias$', '.attn.attn.in_proj_bias'),
    (r'\.attn\.proj\.', '.attn.attn.out_proj.'),
    (r'^pre_norm\.', 'ln_pre.'),
)


def read_vit_state_dict(
        checkpoint: str,
        prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Read a checkpoint's state dict (mmengine, timm or MAE style).

    Strips ``module.``; keeps only and strips ``prefix`` if given, else
    ``backbone.`` when the checkpoint is a whole OpenMMLab model.
    """
    return read_backbone_state(checkpoint, prefix, _default_prefix)


def _default_prefix(state: Dict[str, torch.Tensor]) -> str:
    """``'backbone.'`` for a whole OpenMMLab model, else ``''``."""
    whole = any(k.startswith('backbone.') for k in state)
    return 'backbone.' if whole else ''


def timm_to_mmpretrain(
        state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm / MAE ViT keys renamed to mmpretrain's; others kept (the
    classification ``head`` and MAE's decoder are dropped)."""
    if not any(k.startswith('blocks.') for k in state):
        return state
    out = {}
    for key, value in state.items():
        if key.startswith(('head.', 'decoder', 'mask_token')):
            continue
        for pattern, repl in _TIMM_RENAMES:
            new = re.sub(pattern, repl, key)
            if new != key:
                key = new
                break
        out[key] = value
    return out


def _renamed(state: Dict[str, torch.Tensor],
             renames: Tuple[Tuple[str, str], ...]) -> Dict[str, torch.Tensor]:
    """``state`` with every ``(pattern, replacement)`` applied to each key,
    in order."""
    out = {}
    for key, value in state.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def mmseg_to_mmpretrain(
        state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmseg ``VisionTransformer`` keys (also what mmseg's
    ``vit2mmseg.py`` writes) renamed to mmpretrain's; others kept."""
    if not any(k.endswith('.attn.attn.in_proj_weight') for k in state):
        return state
    return _renamed(state, _MMSEG_RENAMES)


def mmpretrain_to_mmseg(
        state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmpretrain ``VisionTransformer`` keys renamed to mmseg's (the
    inverse of :func:`mmseg_to_mmpretrain`: the round trip either way is the
    identity); others kept, a state dict with mmseg keys returned as is.

    Keys mmseg's ViT has no place for (layer scales ``gamma1`` /
    ``gamma2``, the ``ln2`` of ``out_type='avg_featmap'``) are kept too: a
    strict load names them.
    """
    if not any(k.endswith('.attn.qkv.weight') for k in state):
        return state
    return _renamed(state, _MMPRETRAIN_TO_MMSEG)


def vit_lego_linears(
        backbone: 'LegoViT') -> Iterator[Tuple[str, str, LegoLinear, int]]:
    """Yield ``(lego name, stock name, module, lego-layer index)``."""
    from ..backbones.lego_vit_blocks import DENSE_NAMES
    for i, layer in enumerate(backbone.layers):
        for name, module in layer.lego_linears().items():
            lego_layer = 2 * i + (0 if name.startswith('attn.') else 1)
            yield (f'layers.{i}.{name}', f'layers.{i}.{DENSE_NAMES[name]}',
                   module, lego_layer)


def load_vit_dense_or_lego(
        backbone: 'LegoViT',
        state: Dict[str, torch.Tensor],
        task_map: Optional[Mapping[str, str]] = None) -> None:
    """Load a LegoViT state dict, or inflate a dense ViT one.

    Raises:
        ValueError: a tensor's shape fits neither layout (names the key and
            the expected and given shapes), or the lego layout differs.
        KeyError: a task maps to no task of the checkpoint.
    """
    check_lego_source(state, task_map, 'LegoViT')
    if '_extra_state' in state:
        given = unpack_state(state['_extra_state']).get('lego_layout', {})
        if given.get('backbone') == 'LegoViT' and (
                task_map or given.get('tasks') != backbone.tasks):
            state = remap_tasks(backbone, state, task_map or {})
    if '_extra_state' in state or 'router.logits' in state:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith('router.')]
    else:
        missing, unexpected = _inflate(
            backbone, mmseg_to_mmpretrain(timm_to_mmpretrain(state)))
    log_key_mismatch('LegoViT', missing, unexpected)


def _inflate(backbone: 'LegoViT', state: Dict[str, torch.Tensor]):
    slots = inflate_slots(backbone.num_legos, backbone.num_active)
    used, missing = set(), []
    lego = set()
    for name, dense, module, _ in vit_lego_linears(backbone):
        lego.add(name)
        weight, bias = state.get(f'{dense}.weight'), state.get(f'{dense}.bias')
        if weight is None:
            missing.append(f'{dense}.weight')
            continue
        try:
            module.load_dense(weight, bias, slots)
        except ValueError as e:
            raise ValueError(f'{dense}: {e}') from None
        used.update(
            k for k in (f'{dense}.weight', f'{dense}.bias') if k in state)
    shared = {}
    for key, value in backbone.state_dict().items():
        owner = key.rsplit('.', 2)[0]
        if key.startswith('router.') or key.endswith('_extra_state') or \
                owner in lego or key.rsplit('.', 1)[0] in lego:
            continue
        if key not in state:
            missing.append(key)
            continue
        if key != 'pos_embed' and state[key].shape != value.shape:
            raise ValueError(f'{key}: expected shape {tuple(value.shape)}, '
                             f'got {tuple(state[key].shape)}')
        shared[key] = state[key]
        used.add(key)
    backbone.load_state_dict(shared, strict=False)  # resizes pos_embed
    return missing, [k for k in state if k not in used]


@torch.no_grad()
def extract_vit_task_state_dict(backbone: 'LegoViT',
                                task: str) -> Dict[str, torch.Tensor]:
    """One task's sub-network as a stock ``VisionTransformer`` state dict
    (no prefix), gates folded into ``attn.proj`` and ``ffn.layers.1``."""
    route = backbone.router.greedy_route(task)
    units = route.indices.tolist()
    out, lego = {}, set()
    for name, dense, module, layer in vit_lego_linears(backbone):
        lego.add(name)
        gates = None if module.lego_out else route.gates[layer]
        weight, bias = module.gather(units[layer], gates)
        out[f'{dense}.weight'] = weight
        if bias is not None:
            out[f'{dense}.bias'] = bias
    for key, value in backbone.state_dict().items():
        owner = key.rsplit('.', 2)[0]
        if key.startswith('router.') or key.endswith('_extra_state') or \
                owner in lego or key.rsplit('.', 1)[0] in lego:
            continue
        out[key] = value
    return {k: v.detach().clone() for k, v in out.items()}
