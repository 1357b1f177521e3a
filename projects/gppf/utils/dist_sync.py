"""Collectives of distributed SIMT: partial gradients, norm statistics,
process-group scoping.

Every function here is called by every rank of the group in the same order
with tensors of the same shapes, whatever tasks or lego units a rank ran:
which tensors take part is agreed first with a small all-reduce, so no
collective can wait for a rank that has nothing to send.
"""
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.dist import all_reduce_params
from torch.distributed import ProcessGroup

from .compat import default_group

__all__ = [
    'sync_partial_grads', 'NormStatsSync', 'default_group',
    'params_requiring_grad'
]


def sync_partial_grads(params: Sequence[nn.Parameter],
                       group: Optional[ProcessGroup] = None,
                       bucket_size_mb: int = 25) -> Dict[str, int]:
    """Sum each parameter's gradient over the ranks that produced one.

    1. One all-reduce of a 0/1 flag per parameter counts its producers.
    2. Parameters no rank produced keep ``grad=None`` on every rank (the
       optimizer skips them everywhere: no weight decay, no momentum step).
    3. The others get a zero gradient where missing and are summed in
       coalesced buckets (mmengine's ``all_reduce_params``), so every rank
       ends with the same gradient.

    The caller scales each loss by ``1 / (ranks that computed it)`` before
    the backward, so the sum is the gradient of the objective over the
    union of the ranks' data.

    Returns:
        dict: ``params`` (synchronised), ``bytes`` (sent by this rank).
    """
    if not params:
        return dict(params=0, bytes=0)
    device = params[0].device
    flags = torch.tensor([p.grad is not None for p in params],
                         dtype=torch.int32,
                         device=device)
    dist.all_reduce(flags, group=group)
    used = [p for p, n in zip(params, flags.tolist()) if n > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in used]
    all_reduce_params(grads, bucket_size_mb=bucket_size_mb, group=group)
    sent = sum(g.numel() * g.element_size() for g in grads)
    return dict(params=len(used), bytes=sent + flags.numel() * 4)


class NormStatsSync:
    """Averages norm running statistics over the ranks that updated them
    since the last call.

    Forward hooks record, per norm, which statistics a training-mode
    forward updated on this rank: a norm that says so itself (its
    ``updated_stats_mask(*args, **kwargs)``, given the forward's arguments,
    returns a 0/1 mask shaped like its ``running_mean``: the route's
    channels of a lego norm, the active task's row of a norm that keeps
    statistics per task) or else all of a stock batch norm (stem,
    downsample and head norms). :meth:`sync` then replaces each running
    mean/var element by its mean over the ranks that updated it and
    leaves the others (identical on every rank) alone;
    ``num_batches_tracked`` takes the maximum. With equal per-rank batches
    the averaged running mean equals the single-process momentum update
    with the global batch mean; the running variance misses the
    between-rank spread of the means (``sync_bn='torch'`` avoids that for
    stock norms under the ``'all'`` placement).

    A buffer job at the end of a step, like mmengine's ``SyncBuffersHook``
    at the end of an epoch, but per element.

    Args:
        module (nn.Module): The model whose norms to track: every
            sub-module with ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` tensors.
    """

    def __init__(self, module: nn.Module) -> None:
        self.norms: List[nn.Module] = []
        # Per norm: None (not updated), True (all of it) or a 0/1 mask.
        self.masks: Dict[int, Union[None, bool, torch.Tensor]] = {}
        for m in module.modules():
            if all(
                    isinstance(getattr(m, name, None), torch.Tensor)
                    for name in ('running_mean', 'running_var',
                                 'num_batches_tracked')):
                self.norms.append(m)
                self.masks[id(m)] = None
                m.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, m: nn.Module, args: tuple, kwargs: dict,
                output: object) -> None:
        """After a forward of ``m``: note the statistics it updated."""
        if not m.training:
            return
        ask = getattr(m, 'updated_stats_mask', None)
        if ask is None:
            self.masks[id(m)] = True
            return
        mask = ask(*args, **kwargs).float()
        old = self.masks[id(m)]
        self.masks[id(m)] = mask if old is None else torch.maximum(old, mask)

    def sync(self, group: Optional[ProcessGroup] = None) -> int:
        """Average the statistics updated since the last call.

        Returns:
            int: Bytes this rank sent.
        """
        if not self.norms:
            return 0
        values, masks = [], []
        for m in self.norms:
            mask = self.masks[id(m)]
            if not isinstance(mask, torch.Tensor):
                fill = torch.ones_like if mask else torch.zeros_like
                mask = fill(m.running_mean)
            for stat in (m.running_mean, m.running_var):
                values.append((stat.float() * mask).flatten())
                masks.append(mask.float().flatten())
        n = sum(v.numel() for v in values)
        flat = torch.cat(values + masks)
        dist.all_reduce(flat, group=group)
        total, count = flat[:n], flat[n:]
        avg = torch.where(count > 0, total / count.clamp(min=1), total)
        offset = 0
        for m in self.norms:
            for stat in (m.running_mean, m.running_var):
                k = stat.numel()
                part = slice(offset, offset + k)
                stat.copy_(
                    torch.where(count[part].view_as(stat) > 0,
                                avg[part].view_as(stat), stat))
                offset += k
            self.masks[id(m)] = None
        tracked = torch.cat(
            [m.num_batches_tracked.flatten() for m in self.norms])
        dist.all_reduce(tracked, op=dist.ReduceOp.MAX, group=group)
        for m, value in zip(
                self.norms,
                tracked.split(
                    [m.num_batches_tracked.numel() for m in self.norms])):
            m.num_batches_tracked.copy_(value.view_as(m.num_batches_tracked))
        return (flat.numel() * flat.element_size() +
                tracked.numel() * tracked.element_size())


def params_requiring_grad(module: nn.Module) -> List[nn.Parameter]:
    """The module's trainable parameters, in registration order."""
    return [p for p in module.parameters() if p.requires_grad]
