"""Moving weights between dense ResNets and LegoResNet.

- :func:`load_dense_or_lego` inflates a dense ResNet state dict (torchvision
  or OpenMMLab keys) into the lego units: unit ``i`` of a layer gets the dense
  channel slice ``i mod k``, so a route whose units cover every slice once
  reproduces the dense network exactly. A LegoResNet state dict loads as is,
  after its lego layout is checked (``LegoResNet.set_extra_state``).
- :func:`extract_task_state_dict` gathers one task's units (its noise-free or
  frozen route) into a dense state dict with stock ``ResNet`` key names and
  shapes, folding the task's gates into the gated norms; norms that keep
  statistics (or affine) per task give the task's own. A stock
  ``type='ResNet'`` backbone loaded with it computes what the LegoResNet
  computes for that task.
"""
from typing import (TYPE_CHECKING, Dict, Iterator, Mapping, Optional, Tuple,
                    Union)

import torch

from .backbone_state import log_key_mismatch, read_backbone_state
from .layers import LegoBatchNorm, LegoConv2d, inflate_slots
from .packed_state import unpack_state
from .task_norm import TaskNormMixin
from .task_remap import check_lego_source, remap_tasks

if TYPE_CHECKING:
    from ..backbones.lego_resnet import LegoResNet

__all__ = [
    'read_state_dict', 'lego_modules', 'load_dense_or_lego',
    'extract_task_state_dict'
]

_NORM_TENSORS = ('weight', 'bias', 'running_mean', 'running_var',
                 'num_batches_tracked')
LegoModule = Union[LegoConv2d, LegoBatchNorm]


def read_state_dict(checkpoint: str,
                    prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Read a checkpoint's state dict (mmengine or torchvision style).

    Strips ``module.``; keeps only and strips ``prefix`` if given, else strips
    ``backbone.`` when the checkpoint is a whole OpenMMLab model.
    """
    return read_backbone_state(checkpoint, prefix, _default_prefix)


def _default_prefix(state: Dict[str, torch.Tensor]) -> str:
    """``''`` for a bare ResNet state dict, else ``'backbone.'``."""
    bare = any(k.startswith(('conv1.', 'stem.')) for k in state)
    return '' if bare else 'backbone.'


def lego_modules(
        backbone: 'LegoResNet') -> Iterator[Tuple[str, LegoModule, int, bool]]:
    """Yield ``(name, module, lego-layer index, carries the gates)``."""
    layer = 0
    for name in backbone.res_layers:
        for j, block in enumerate(getattr(backbone, name)):
            for child_name, child in block.named_children():
                if isinstance(child, (LegoConv2d, LegoBatchNorm)):
                    yield (f'{name}.{j}.{child_name}', child, layer,
                           child_name == block.gated_norm)
            layer += 1


def load_dense_or_lego(backbone: 'LegoResNet',
                       state: Dict[str, torch.Tensor],
                       task_map: Optional[Mapping[str, str]] = None) -> None:
    """Load a LegoResNet state dict, or inflate a dense ResNet one.

    A LegoResNet state dict of other tasks gives each of the backbone's
    tasks the route and norm statistics of the checkpoint task
    ``task_map`` names (by default the task of the same name; see
    :func:`remap_tasks`).

    Raises:
        ValueError: a tensor's shape fits neither layout (names the key and
            the expected and given shapes), the lego layout differs, or
            ``task_map`` is given with a dense checkpoint.
        KeyError: a task maps to no task of the checkpoint.
    """
    check_lego_source(state, task_map, 'LegoResNet')
    if '_extra_state' in state:
        given = unpack_state(state['_extra_state']).get('lego_layout', {})
        if task_map or given.get('tasks', backbone.tasks) != backbone.tasks:
            state = remap_tasks(backbone, state, task_map or {})
    if 'router.logits' in state or '_extra_state' in state:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith('router.')]
    else:
        slots = inflate_slots(backbone.num_legos, backbone.num_active)
        lego = {name: module for name, module, _, _ in lego_modules(backbone)}
        # Norms with per-task tensors replicate the dense ones themselves.
        task_norms = _task_norms(backbone)
        target = backbone.state_dict()
        shared, used, missing = {}, set(), []
        for key, value in state.items():
            owner = key.rsplit('.', 1)[0]
            if owner in lego:
                continue
            if owner in task_norms:
                shared[key] = value
            elif key in target:
                if value.shape != target[key].shape:
                    raise ValueError(f'{key}: expected shape '
                                     f'{tuple(target[key].shape)}, got '
                                     f'{tuple(value.shape)}')
                shared[key] = value
        backbone.load_state_dict(shared, strict=False)
        used.update(shared)
        for name, module in lego.items():
            if isinstance(module, LegoConv2d):
                key = f'{name}.weight'
                if key not in state:
                    missing.append(key)
                    continue
                module.load_dense(state[key], slots)
                used.add(key)
            else:
                dense = {
                    t: state[f'{name}.{t}']
                    for t in _NORM_TENSORS if f'{name}.{t}' in state
                }
                missing += [
                    f'{name}.{t}' for t in _NORM_TENSORS[:4] if t not in dense
                ]
                module.load_dense(dense, slots)
                used.update(f'{name}.{t}' for t in dense)
        missing += [
            f'{name}.{t}' for name in task_norms for t in _NORM_TENSORS[:4]
            if f'{name}.{t}' not in state
        ]
        missing += [
            k for k in target if k not in used and not k.startswith('router.')
            and not k.endswith('_extra_state') and
            not {k.rsplit('.', 1)[0], k.rsplit('.', 2)[0]}
            & (set(lego) | set(task_norms))
        ]
        unexpected = [k for k in state if k not in used]
    log_key_mismatch('LegoResNet', missing, unexpected)


@torch.no_grad()
def extract_task_state_dict(backbone: 'LegoResNet',
                            task: str) -> Dict[str, torch.Tensor]:
    """One task's sub-network as a stock ResNet state dict (no prefix)."""
    route = backbone.router.greedy_route(task)
    units = route.indices.tolist()
    t = backbone.router.task_index(task)
    out, lego = {}, set()
    for name, module in _task_norms(backbone).items():
        lego.add(name)
        out.update({f'{name}.{k}': v for k, v in module.task_state(t).items()})
    for name, module, layer, gated in lego_modules(backbone):
        lego.add(name)
        if isinstance(module, LegoConv2d):
            out[f'{name}.weight'] = module.gather(units[layer])
            continue
        tensors = module.gather(units[layer], t)
        if gated:
            gates = route.gates[layer].repeat_interleave(module.unit_width)
            tensors['weight'] = tensors['weight'] * gates
            tensors['bias'] = tensors['bias'] * gates
        out.update({f'{name}.{t}': v for t, v in tensors.items()})
    for key, value in backbone.state_dict().items():
        owner = key.rsplit('.', 1)[0]
        if (key.startswith('router.') or key.endswith('_extra_state')
                or owner in lego or owner.rsplit('.', 1)[0] in lego):
            continue
        out[key] = value
    return {k: v.detach().clone() for k, v in out.items()}


def _task_norms(backbone: 'LegoResNet') -> Dict[str, TaskNormMixin]:
    """The backbone's norms with per-task tensors, by module name."""
    return {
        name: m
        for name, m in backbone.named_modules()
        if isinstance(m, TaskNormMixin)
    }
