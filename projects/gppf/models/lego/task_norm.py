"""Batch norms that keep running statistics per task.

A norm shared by several tasks (a lego backbone's stem, ``downsample`` and
residual-stream norms) would otherwise average the statistics of all of them:
the statistics of 28-px digits are wrong for 128-px canvases, those of
224-px ImageNet crops for 800 x 1333 COCO images. :class:`TaskBatchNorm2d`
(``'TaskBN'``) and :class:`TaskSyncBatchNorm` (``'TaskSyncBN'``) hold
``running_mean`` / ``running_var`` of shape ``(num_tasks, C)`` and
``num_batches_tracked`` of shape ``(num_tasks, )``; the affine is shared, or
per task with ``task_affine=True`` (``task_weight.<t>``, ``task_bias.<t>``).
The owner sets :attr:`task_index` before the forward; the forward points the
stock module's buffers (and affine) at that task's row and runs the stock
``BatchNorm2d`` / ``SyncBatchNorm`` forward, which updates the row in place.
A state dict of a stock norm (``(C, )`` statistics, shared affine) loads
with its tensors replicated per task.
"""
from typing import Dict, List

import torch
import torch.nn as nn
from mmengine.registry import MODELS

from ...utils.compat import sync_bn_input_check
from .layers import replicate_task_rows

__all__ = [
    'TaskNormMixin', 'TaskBatchNorm2d', 'TaskSyncBatchNorm', 'TASK_NORMS',
    'task_norm_cfg', 'affine_weights', 'affine_biases'
]

_STATS = ('running_mean', 'running_var', 'num_batches_tracked')


class TaskNormMixin:
    """Per-task running statistics (and optionally affine) for a stock
    ``_BatchNorm`` subclass; see the module docstring."""

    num_features: int
    task_index: int = 0
    #: the stock forward run on the task's row
    _norm_forward = nn.BatchNorm2d.forward

    def _init_tasks(self, num_tasks: int, task_affine: bool) -> None:
        if num_tasks < 1:
            raise ValueError(f'num_tasks must be >= 1, got {num_tasks}')
        self.num_tasks = num_tasks
        self.task_affine = task_affine
        self.task_index = 0
        c = self.num_features
        self.register_buffer('running_mean', torch.zeros(num_tasks, c))
        self.register_buffer('running_var', torch.ones(num_tasks, c))
        self.register_buffer('num_batches_tracked',
                             torch.zeros(num_tasks, dtype=torch.long))
        if task_affine:
            grad = self.weight.requires_grad
            self.task_weight = nn.ParameterList(
                nn.Parameter(torch.ones(c), requires_grad=grad)
                for _ in range(num_tasks))
            self.task_bias = nn.ParameterList(
                nn.Parameter(torch.zeros(c), requires_grad=grad)
                for _ in range(num_tasks))
            self.weight = None
            self.bias = None

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        for weight in affine_weights(self):
            nn.init.ones_(weight)
        for bias in affine_biases(self):
            nn.init.zeros_(bias)

    def task_state(self, task_index: int) -> Dict[str, torch.Tensor]:
        """One task's tensors under a stock ``BatchNorm2d``'s names."""
        t = task_index
        weight, bias = ((self.task_weight[t],
                         self.task_bias[t]) if self.task_affine else
                        (self.weight, self.bias))
        return dict(
            weight=weight,
            bias=bias,
            running_mean=self.running_mean[t],
            running_var=self.running_var[t],
            num_batches_tracked=self.num_batches_tracked[t])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stock forward with the buffers (and affine) of task
        :attr:`task_index`."""
        full = {name: getattr(self, name) for name in _STATS}
        t = self.task_index
        for name, value in full.items():
            setattr(self, name, value[t])
        if self.task_affine:
            self.weight, self.bias = self.task_weight[t], self.task_bias[t]
        try:
            return self._norm_forward(x)
        finally:
            for name, value in full.items():
                setattr(self, name, value)
            if self.task_affine:
                self.weight = self.bias = None

    def updated_stats_mask(self, *args, **kwargs) -> torch.Tensor:
        """Which running statistics a training-mode forward updates: a 0/1
        mask shaped like ``running_mean``, set on the row of
        :attr:`task_index`. Asked by
        :class:`~projects.gppf.utils.dist_sync.NormStatsSync`."""
        mask = torch.zeros_like(self.running_mean)
        mask[self.task_index] = 1.0
        return mask

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args,
                              **kwargs) -> None:
        """Replicate a stock norm's ``(C, )`` statistics (and shared affine,
        when the affine is per task) over the tasks."""
        replicate_task_rows(self, state_dict, prefix)
        if self.task_affine:
            for name, plist in (('weight', self.task_weight),
                                ('bias', self.task_bias)):
                value = state_dict.pop(prefix + name, None)
                if value is not None:
                    for t in range(self.num_tasks):
                        state_dict.setdefault(f'{prefix}task_{name}.{t}',
                                              value.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f', num_tasks={self.num_tasks}, '
                f'task_affine={self.task_affine}')


@MODELS.register_module('TaskBN')
class TaskBatchNorm2d(TaskNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with statistics per task (see the module).

    Args:
        num_features (int): Channels.
        num_tasks (int): Tasks.
        task_affine (bool): One affine per task instead of a shared one.
        **kwargs: As in :class:`torch.nn.BatchNorm2d`.
    """

    def __init__(self,
                 num_features: int,
                 num_tasks: int = 1,
                 task_affine: bool = False,
                 **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self._init_tasks(num_tasks, task_affine)


@MODELS.register_module('TaskSyncBN')
class TaskSyncBatchNorm(TaskBatchNorm2d):
    """:class:`TaskBatchNorm2d` whose forward is ``nn.SyncBatchNorm``'s: the
    batch statistics synchronise over the default process group, which
    distributed SIMT scopes to the ranks running the task; without a
    process group it is plain batch norm. Not an ``nn.SyncBatchNorm``, so
    mmengine's ``revert_sync_batchnorm`` (single-process runs) keeps it."""

    process_group = None
    # Called by SyncBatchNorm.forward on self (pinned in utils/compat.py).
    _check_non_zero_input_channels = sync_bn_input_check
    _norm_forward = nn.SyncBatchNorm.forward


#: stock norm type -> its per-task twin
TASK_NORMS = {'BN': 'TaskBN', 'BN2d': 'TaskBN', 'SyncBN': 'TaskSyncBN'}


def task_norm_cfg(norm_cfg: dict, num_tasks: int, task_affine: bool) -> dict:
    """``norm_cfg`` of a stock batch norm turned into its per-task twin."""
    if norm_cfg['type'] not in TASK_NORMS:
        raise ValueError(f'per-task statistics need a batch norm, one of '
                         f"{sorted(TASK_NORMS)}; got {norm_cfg['type']!r}")
    return dict(
        norm_cfg,
        type=TASK_NORMS[norm_cfg['type']],
        num_tasks=num_tasks,
        task_affine=task_affine)


def affine_weights(norm: nn.Module) -> List[nn.Parameter]:
    """The scale parameters of a norm: its ``weight``, or every task's."""
    if getattr(norm, 'task_affine', False):
        return list(norm.task_weight)
    return [norm.weight] if norm.weight is not None else []


def affine_biases(norm: nn.Module) -> List[nn.Parameter]:
    """The shift parameters of a norm: its ``bias``, or every task's."""
    if getattr(norm, 'task_affine', False):
        return list(norm.task_bias)
    return [norm.bias] if norm.bias is not None else []
