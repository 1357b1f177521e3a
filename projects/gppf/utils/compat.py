"""The private names of torch and mmengine that the project relies on.

A private (underscore) name has no compatibility promise: an upgrade may
remove or change it silently. The project reaches such names only through
this module, or uses them in place for the reason given below.
``tests/test_compat.py`` pins every one of them, and fails with the name
and the installed version when an upgrade removes or changes one. Pinned on
torch 2.14.1, mmengine 0.10.7 and mmpretrain 1.2.0 (:data:`PINNED`).

Reached through this module:

* ``torch.distributed.distributed_c10d._world.default_pg``
  (:func:`default_group`): torch has no public way to make a subgroup the
  default process group, and stock heads and norms (mmdet's
  ``reduce_mean``, ``SyncBatchNorm``) run their collectives on the default
  group. torch's source calls ``_world`` an experimental extension point;
  it is not public API. Needs torch >= 2.0 and a settable ``default_pg``.
* ``torch._amp_foreach_non_finite_check_and_unscale_``,
  ``torch._foreach_norm`` and ``torch._foreach_add_``
  (:func:`non_finite_check_and_unscale_`, :func:`foreach_norm`,
  :func:`foreach_add_`): the fused kernels that ``GradScaler`` and
  ``clip_grad_norm_`` use, one pass per device and dtype instead of one per
  tensor. If one is missing, a per-tensor loop gives the same values,
  more slowly.
* ``nn.SyncBatchNorm._check_non_zero_input_channels``
  (:data:`sync_bn_input_check`): ``nn.SyncBatchNorm.forward`` calls it on
  ``self``, and ``TaskSyncBatchNorm`` runs that forward without being an
  ``nn.SyncBatchNorm``. If it is missing, an equivalent check is used.
* ``torch.nn.modules.batchnorm._BatchNorm`` (:data:`BatchNormBase`):
  torch's base class of every batch norm, for ``isinstance`` checks (as in
  mmengine and mmcv).

Used in place, and pinned:

* ``nn.Module._load_from_state_dict`` (overridden in
  ``models/lego/layers.py`` and ``models/lego/task_norm.py``): torch's
  documented hook for custom state-dict loading.
* ``nn.Module._register_load_state_dict_pre_hook``
  (``models/backbones/lego_vit.py``): a hook called with ``(state_dict,
  prefix, ...)``, as mmpretrain's ``VisionTransformer`` registers to resize
  ``pos_embed``; the public ``register_load_state_dict_pre_hook`` passes the
  module first.
* mmpretrain's ``VisionTransformer._format_output``
  (``models/backbones/lego_vit.py``): the stock ViT's output formatting,
  reused as a method.
* ``OptimWrapper._inner_count`` (``engine/simt_optim_wrapper.py``): the
  counter that mmengine documents for optim-wrapper subclasses that
  override ``update_params`` or ``backward``.
* ``nn.Module._modules`` (``models/gppf.py``): the dict of child modules;
  a task model's stock backbone and preprocessor are deleted from it and
  kept as plain references (registered once, in ``GPPF``).
* ``BaseLoop._runner``, ``IterBasedTrainLoop._iter``, ``_max_iters`` and
  ``_decide_current_val_interval`` (``engine/simt_train_loop.py``,
  ``engine/simt_loops.py``): a custom loop subclasses mmengine's and keeps
  its state in these fields, like mmengine's own loops.
* numpy's ``core.multiarray._reconstruct`` (``utils/checkpoint.py``): the
  function that numpy arrays pickle with, allow-listed for
  ``torch.load(weights_only=True)`` of mmengine checkpoints.
"""
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.utils import digit_version
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    'PINNED', 'BatchNormBase', 'default_group', 'foreach_add_', 'foreach_norm',
    'non_finite_check_and_unscale_', 'sync_bn_input_check', 'world_state'
]

#: The versions on which every name here was checked.
PINNED = dict(torch='2.14.1', mmengine='0.10.7', mmpretrain='1.2.0')

#: torch's base class of ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``.
BatchNormBase = _BatchNorm

_AMP_CHECK = getattr(torch, '_amp_foreach_non_finite_check_and_unscale_', None)
_FOREACH_NORM = getattr(torch, '_foreach_norm', None)
_FOREACH_ADD_ = getattr(torch, '_foreach_add_', None)


def non_finite_check_and_unscale_(tensors: Sequence[torch.Tensor],
                                  found_inf: torch.Tensor,
                                  inv_scale: torch.Tensor) -> None:
    """Multiply ``tensors`` by ``inv_scale`` in place and set ``found_inf``
    to 1 if any of their values is not finite (``GradScaler``'s check).

    Args:
        tensors (Sequence[Tensor]): Tensors of one device and dtype.
        found_inf (Tensor): ``(1, )`` float on that device; set to 1 or
            left as it is.
        inv_scale (Tensor): ``(1, )`` float on that device.
    """
    if _AMP_CHECK is not None:
        _AMP_CHECK(list(tensors), found_inf, inv_scale)
        return
    for t in tensors:
        bad = (~torch.isfinite(t)).any().to(found_inf.dtype)
        found_inf.copy_(torch.maximum(found_inf, bad.view_as(found_inf)))
        t.mul_(inv_scale.to(t.dtype))


def foreach_norm(tensors: Sequence[torch.Tensor],
                 ord: float = 2.0) -> List[torch.Tensor]:
    """The ``ord``-norm of each tensor, as 0-dim tensors."""
    if _FOREACH_NORM is not None:
        return list(_FOREACH_NORM(list(tensors), ord))
    return [torch.linalg.vector_norm(t, ord) for t in tensors]


def foreach_add_(tensors: Sequence[torch.Tensor],
                 others: Sequence[torch.Tensor]) -> None:
    """``tensors[i] += others[i]`` in place, for every ``i``."""
    if _FOREACH_ADD_ is not None:
        _FOREACH_ADD_(list(tensors), list(others))
        return
    for t, o in zip(tensors, others):
        t.add_(o)


def _check_non_zero_input_channels(self: nn.Module,
                                   input: torch.Tensor) -> None:
    """What ``nn.SyncBatchNorm`` checks before its forward."""
    if input.size(1) == 0:
        raise ValueError(
            'SyncBatchNorm number of input channels should be non-zero')


#: ``nn.SyncBatchNorm._check_non_zero_input_channels``, a method that
#: ``nn.SyncBatchNorm.forward`` calls on ``self``.
sync_bn_input_check = getattr(nn.SyncBatchNorm,
                              '_check_non_zero_input_channels',
                              _check_non_zero_input_channels)


def world_state() -> Any:
    """torch's process-group state (``distributed_c10d._world``), checked.

    Raises:
        RuntimeError: torch < 2.0, or no settable ``_world.default_pg``
            (naming the installed torch version).
    """
    where = ('torch.distributed.distributed_c10d._world.default_pg '
             '(projects/gppf/utils/compat.py)')
    if digit_version(torch.__version__) < digit_version('2.0.0'):
        raise RuntimeError(f'{where} needs torch >= 2.0, found torch '
                           f'{torch.__version__}')
    from torch.distributed import distributed_c10d
    world = getattr(distributed_c10d, '_world', None)
    prop = getattr(type(world), 'default_pg', None)
    if not isinstance(prop, property) or prop.fset is None:
        raise RuntimeError(f'{where} is missing or read-only in torch '
                           f'{torch.__version__} (pinned on torch '
                           f"{PINNED['torch']})")
    return world


@contextmanager
def default_group(group: Optional[Any]) -> Iterator[None]:
    """Make ``group`` torch's default process group inside the block.

    A task that runs on a subset of the ranks (``split`` placement) runs
    its stock model in this block, so the collectives that stock heads and
    norms issue on the default group (mmdet's ``reduce_mean`` of the
    positive count, ``SyncBatchNorm``) reach exactly the ranks that run the
    task instead of waiting forever for the others; ``dist.get_rank()`` and
    ``dist.get_world_size()`` answer for ``group`` in the block. ``None``
    leaves the default group as it is. Swaps the private
    ``distributed_c10d._world.default_pg`` (see :func:`world_state`).

    Args:
        group (ProcessGroup, optional): A group this rank belongs to.
    """
    if group is None:
        yield
        return
    world = world_state()
    previous = world.default_pg
    world.default_pg = group
    try:
        yield
    finally:
        world.default_pg = previous
