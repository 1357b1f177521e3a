"""The SIMT optimizer wrapper: several backward passes, one iteration.

mmengine's ``OptimWrapper.update_params(loss)`` is one iteration of one
loss: ``scale_loss`` (gradient accumulation), ``backward`` (which counts the
iteration in ``_inner_count``) and, when ``should_update()``, ``step`` (clip,
or unscale and clip under AMP, then step) and ``zero_grad``. A SIMT
iteration backwards every task's loss in turn, then the router's, and counts
and updates once. The SIMT wrappers split ``update_params`` at that seam,
by overriding ``backward`` as mmengine documents for subclasses:

* ``backward(loss)`` accumulates one loss's gradients (through the loss
  scaler under AMP) and counts nothing;
* :meth:`~SIMTOptimWrapperMixin.end_iteration` counts the iteration once
  and, when an update is due, sums the gradients over the ranks that
  produced them (distributed runs, :func:`sync_partial_grads`, before any
  unscaling or clipping), steps and zeroes the gradients.

``update_params(loss)`` is still one iteration of one loss. One SIMT
iteration (what :meth:`GPPF.train_step` does)::

    for task, batch in data.items():
        loss = ...  # the task's weighted loss
        optim_wrapper.backward(optim_wrapper.scale_loss(loss))
    optim_wrapper.end_iteration()

Every access to the counter ``_inner_count`` of the SIMT code is in this
module. Configs name ``type='SIMTOptimWrapper'`` or
``'SIMTAmpOptimWrapper'``; :class:`SIMTTrainLoop` turns a stock
``'OptimWrapper'`` / ``'AmpOptimWrapper'`` into its SIMT twin before the
runner builds it (:func:`use_simt_optim_wrapper`).
"""
import copy
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.dist import get_world_size
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from ..utils.dist_sync import sync_partial_grads

__all__ = [
    'SIMTOptimWrapperMixin', 'SIMTOptimWrapper', 'SIMTAmpOptimWrapper',
    'use_simt_optim_wrapper'
]


class SIMTOptimWrapperMixin:
    """One optimizer iteration over several backward passes (see the module).

    Mixed into an mmengine ``OptimWrapper`` subclass, before it: the
    subclass's ``step`` (clipping, loss-scaler unscaling and skipping) and
    ``zero_grad`` are kept; its ``backward`` is overridden not to count.

    Distributed (a process group of more than one rank), gradients are
    local to each rank until an update is due (as
    :class:`SIMTDistributedWrapper` leaves them: each loss already divided
    by the ranks that computed it); :meth:`end_iteration` then sums them
    over the ranks. Do not use it under a wrapper that synchronises
    gradients itself (``DistributedDataParallel``).

    Args:
        bucket_size_mb (int): Size of the coalesced buckets of the
            distributed gradient sum. Default: 25.
        **kwargs: The optimizer wrapper's own arguments.
    """

    def __init__(self, *args, bucket_size_mb: int = 25, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bucket_size_mb = int(bucket_size_mb)
        #: The gradient sum of the last iteration: ``params``, ``bytes``
        #: (sent by this rank) and ``time`` (s); zeros when none ran.
        self.last_sync: Dict[str, float] = dict(params=0, bytes=0, time=0.0)

    def end_iteration(self,
                      step_kwargs: Optional[Dict] = None,
                      zero_kwargs: Optional[Dict] = None) -> bool:
        """Count one iteration; when an update is due (every
        ``accumulative_counts`` iterations, or the last one), sum the
        gradients over the ranks (distributed), ``step`` and ``zero_grad``.

        Returns:
            bool: Whether the optimizer stepped.
        """
        self._inner_count += 1
        self.last_sync = dict(params=0, bytes=0, time=0.0)
        if not self.should_update():
            return False
        if get_world_size() > 1:
            self.sync_grads()
        self.step(**(step_kwargs or {}))
        self.zero_grad(**(zero_kwargs or {}))
        return True

    def update_params(self,
                      loss: torch.Tensor,
                      step_kwargs: Optional[Dict] = None,
                      zero_kwargs: Optional[Dict] = None) -> None:
        """mmengine's one iteration of one loss: backward, then
        :meth:`end_iteration`."""
        self.backward(self.scale_loss(loss))
        self.end_iteration(step_kwargs, zero_kwargs)

    def sync_grads(self) -> None:
        """Sum the gradients of the optimizer's parameters over all ranks,
        each over the ranks that produced one (:func:`sync_partial_grads`);
        every rank calls it at the same iteration."""
        start = time.perf_counter()
        stats = sync_partial_grads(
            self.trainable_params(), bucket_size_mb=self.bucket_size_mb)
        self.last_sync = dict(stats, time=time.perf_counter() - start)

    def trainable_params(self) -> List[nn.Parameter]:
        """The optimizer's parameters that require a gradient, in the
        order of its parameter groups (the same on every rank)."""
        return [
            p for group in self.optimizer.param_groups for p in group['params']
            if p.requires_grad
        ]


@OPTIM_WRAPPERS.register_module()
class SIMTOptimWrapper(SIMTOptimWrapperMixin, OptimWrapper):
    """mmengine's ``OptimWrapper`` for SIMT iterations (see the module).

    Example::

        optim_wrapper = dict(
            type='SIMTOptimWrapper',
            optimizer=dict(type='SGD', lr=0.02, momentum=0.9),
            clip_grad=dict(max_norm=35))
    """

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """Accumulate ``loss``'s gradients; counts no iteration."""
        loss.backward(**kwargs)


@OPTIM_WRAPPERS.register_module()
class SIMTAmpOptimWrapper(SIMTOptimWrapperMixin, AmpOptimWrapper):
    """mmengine's ``AmpOptimWrapper`` for SIMT iterations: each loss is
    multiplied by the loss scaler's scale before its backward; the step
    unscales (and clips) the summed gradients once and skips the update
    when they are not finite, as the stock wrapper does."""

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """Accumulate the scaled ``loss``'s gradients; counts no
        iteration."""
        self.loss_scaler.scale(loss).backward(**kwargs)


#: stock wrapper type -> its SIMT twin
SIMT_TWINS = {
    'OptimWrapper': 'SIMTOptimWrapper',
    'AmpOptimWrapper': 'SIMTAmpOptimWrapper'
}


def use_simt_optim_wrapper(runner: Any) -> None:
    """Make the runner build a SIMT optimizer wrapper.

    Called by :class:`SIMTTrainLoop` while the runner builds it, which
    ``Runner.train()`` does before it builds the optimizer wrapper from
    ``runner.optim_wrapper``. A config without a type or with the stock
    ``'OptimWrapper'`` / ``'AmpOptimWrapper'`` gets its SIMT twin (logged);
    a SIMT type is kept.

    Raises:
        TypeError: Another wrapper type, several optimizer wrappers, or a
            stock wrapper already built; the message names the fix.
    """
    cfg = runner.optim_wrapper
    fix = ("use optim_wrapper=dict(type='SIMTOptimWrapper', ...) or "
           "type='SIMTAmpOptimWrapper' (projects/gppf/engine/"
           'simt_optim_wrapper.py)')
    if cfg is None or isinstance(cfg, SIMTOptimWrapperMixin):
        return
    if isinstance(cfg, OptimWrapper):
        raise TypeError(f'SIMTTrainLoop: the optimizer wrapper is an '
                        f'already built {type(cfg).__name__}, which counts '
                        'one iteration per backward; a SIMT iteration runs '
                        f'one backward per task: {fix}')
    if not isinstance(cfg, (dict, Config)):
        return  # mmengine's build_optim_wrapper names the problem
    if 'optimizer' not in cfg and 'constructor' not in cfg:
        raise TypeError('SIMTTrainLoop trains with one optimizer wrapper '
                        '(optim_wrapper=dict(optimizer=...)); use '
                        'paramwise_cfg for per-module settings')
    kind = cfg.get('type', 'OptimWrapper')
    name = kind if isinstance(kind, str) else getattr(kind, '__name__', '')
    name = name.split('.')[-1]
    if name in SIMT_TWINS and (isinstance(kind, str)
                               or kind in (OptimWrapper, AmpOptimWrapper)):
        cfg = copy.copy(cfg)
        cfg['type'] = SIMT_TWINS[name]
        runner.optim_wrapper = cfg
        print_log(
            f"SIMTTrainLoop: optim_wrapper type '{name}' -> "
            f"'{SIMT_TWINS[name]}' (one backward per task, one iteration "
            'counted per SIMT step)',
            logger='current')
        return
    cls = kind if isinstance(kind, type) else OPTIM_WRAPPERS.get(kind)
    if cls is not None and not issubclass(cls, SIMTOptimWrapperMixin):
        raise TypeError(f"SIMTTrainLoop: optim_wrapper type '{name}' counts "
                        'one iteration per backward; a SIMT iteration runs '
                        'one backward per task. Mix SIMTOptimWrapperMixin '
                        f'into it, or {fix}')
