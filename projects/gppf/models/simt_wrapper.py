"""Data-parallel SIMT over ranks that may run different tasks.

Stock ``DistributedDataParallel`` reduces gradients during one backward and
divides by the world size. SIMT runs one backward per task, ranks may run
different tasks (``split`` placement) and tasks use different lego units, so
DDP would either fail on parameters a rank did not use or average zeros in
for them (PyTorch issue 41101). This wrapper instead lets every task's
backward accumulate locally and synchronises once, before the optimizer
step (see :mod:`projects.gppf.utils.dist_sync`).

The rule: every loss term is divided by the number of ranks that computed
it (a task's loss by the ranks that ran the task, the router's balance loss,
which every rank computes from the routes of all ranks, by the world size),
then gradients are summed over the ranks that produced one. The result is
the gradient of the SIMT objective over the union of all ranks' data: a
task head or a lego unit that only the ranks of one task use gets the mean
of those ranks' gradients (exactly one rank's gradient if one rank ran it),
and a parameter shared by tasks gets the sum over tasks of the per-task
means, as in a single process.
"""
import time
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.optim import OptimWrapper
from mmengine.registry import MODEL_WRAPPERS

from ..utils.dist_sync import (NormStatsSync, default_group,
                               params_requiring_grad, sync_partial_grads)
from .lego.router import TaskRouter
from .task_context import current_task

__all__ = ['SIMTDistributedWrapper']


@MODEL_WRAPPERS.register_module()
class SIMTDistributedWrapper(nn.Module):
    """Distributed wrapper of a :class:`GPPF` model for the SIMT loops.

    Set it with ``model_wrapper_cfg=dict(type='SIMTDistributedWrapper')``
    (the GPPF configs do); mmengine's runner builds it when launched with a
    distributed launcher. :class:`SIMTTrainLoop` tells it which ranks run
    which task (:meth:`set_task_ranks`).

    Per training iteration, on every rank: each of its tasks forward and
    backward (inside the task's process group, so stock heads' collectives
    reach exactly the ranks running the task; a task whose loss or gradient
    is not finite on one of its ranks is skipped on all of them, see
    :class:`NonFiniteGuard`), the router's routes and call
    counts are exchanged, the balance loss backward, then, when the optimizer
    is due to step, the gradients are synchronised (before unscaling and
    clipping), the optimizer steps, the norms' running statistics are
    averaged and the logged values are gathered so that every rank logs
    every task.

    Args:
        module (nn.Module): The :class:`GPPF` model.
        bucket_size_mb (float): Size of the coalesced gradient buckets.
            Default: 25.
        sync_norm_stats (bool): Average batch-norm running statistics over
            the ranks that updated them, every iteration (see
            :class:`NormStatsSync`). Default: True.

    Replicas must start equal: mmengine's runner broadcasts every
    ``state_dict()`` value from rank 0 when training starts
    (``Runner._init_model_weights``) and loads the same checkpoint on every
    rank for testing; outside the runner, build the model with the same
    seed on every rank.
    """

    def __init__(self,
                 module: nn.Module,
                 bucket_size_mb: int = 25,
                 sync_norm_stats: bool = True) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError('SIMTDistributedWrapper needs an initialised '
                               'process group (launch with tools/'
                               'dist_train.sh or --launcher pytorch)')
        for name in ('task_backward', 'aux_backward', 'finish_step'):
            if not callable(getattr(module, name, None)):
                raise TypeError('SIMTDistributedWrapper wraps a SIMT model '
                                f'(GPPF); {type(module).__name__} has no '
                                f'{name}()')
        self.module = module
        self.bucket_size_mb = int(bucket_size_mb)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.params = params_requiring_grad(module)
        self.routers = [
            m for m in module.modules() if isinstance(m, TaskRouter)
        ]
        self.norm_stats = NormStatsSync(module) if sync_norm_stats else None
        self.task_ranks: Optional[Dict[str, List[int]]] = None
        self.task_groups: Dict[str, Any] = {}
        self.last_sync: Dict[str, float] = {}

    # -------------------------------------------------------------- set-up
    def set_task_ranks(self, task_ranks: Mapping[str, Sequence[int]]) -> None:
        """Record which global ranks run each task and create a process
        group per distinct rank set (a collective call: every rank calls it
        with the same mapping).

        Args:
            task_ranks (dict[str, list[int]]): Ranks per task; a task run
                by every rank uses the default group.
        """
        unknown = set(task_ranks) - set(self.module.task_names)
        if unknown:
            raise KeyError(f'set_task_ranks: unknown tasks {sorted(unknown)}; '
                           f'tasks: {self.module.task_names}')
        ranks = {t: sorted(int(r) for r in rs) for t, rs in task_ranks.items()}
        groups: Dict[tuple, Any] = {}
        for key in sorted({tuple(r) for r in ranks.values()}):
            bad = [r for r in key if not 0 <= r < self.world_size]
            if not key or bad:
                raise ValueError(f'set_task_ranks: rank set {list(key)} is '
                                 f'not a non-empty subset of the '
                                 f'{self.world_size} ranks')
            groups[key] = (None if len(key) == self.world_size else
                           dist.new_group(list(key)))
        self.task_ranks = ranks
        self.task_groups = {t: groups[tuple(r)] for t, r in ranks.items()}

    # ---------------------------------------------------------------- steps
    def train_step(self, data: Mapping[str, Any],
                   optim_wrapper: OptimWrapper) -> Dict[str, torch.Tensor]:
        """One distributed SIMT iteration on this rank's tasks (``data``
        holds a batch of each); returns the log variables of every task,
        averaged over the ranks that ran it, on every rank."""
        if not isinstance(data, Mapping):
            raise TypeError('SIMTDistributedWrapper.train_step expects a '
                            'dict of batches keyed by task')
        counts = self._task_counts(list(data))
        local: Dict[str, float] = OrderedDict()
        for task in data:
            with default_group(self.task_groups.get(task)):
                task_vars = self.module.task_backward(
                    task,
                    data[task],
                    optim_wrapper,
                    grad_scale=1.0 / counts[task],
                    agree=_all_ranks_finite)
            local[f'{task}/_weighted_loss'] = task_vars.pop('loss')
            local.update(task_vars)
        start = time.perf_counter()
        self._sync_routers()  # the first collective: waits for the slowest
        wait_time = time.perf_counter() - start
        aux_vars = self.module.aux_backward(
            optim_wrapper,
            grad_scale=1.0 / self.world_size,
            agree=_all_ranks_finite)
        aux_vars.pop('loss', None)
        local.update(aux_vars)
        stats = dict(bytes=0, time=0.0)

        def sync() -> None:
            begin = time.perf_counter()
            stats.update(
                sync_partial_grads(
                    self.params, bucket_size_mb=self.bucket_size_mb))
            stats['time'] = time.perf_counter() - begin

        self.module.finish_step(optim_wrapper, before_step=sync)
        start = time.perf_counter()
        if self.norm_stats is not None:
            stats['bytes'] += self.norm_stats.sync()
        sync_time = stats['time'] + time.perf_counter() - start
        self.last_sync = dict(
            wait=wait_time, time=sync_time, bytes=float(stats['bytes']))
        local['dist/wait_time'] = torch.tensor(wait_time)
        local['dist/sync_time'] = torch.tensor(sync_time)
        local['dist/sync_mb'] = torch.tensor(stats['bytes'] / 2**20)
        out = self._gather_log_vars(local)
        self.module.nonfinite.record(out)  # the same counts on every rank
        return out

    def _task_counts(self, tasks: List[str]) -> Dict[str, int]:
        """Ranks running each task this iteration (from the placement, or
        counted with one all-reduce when none was set)."""
        names = self.module.task_names
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise KeyError(f'unknown tasks {unknown} in the batch; GPPF '
                           f'tasks: {names}')
        if self.task_ranks is not None:
            missing = [
                t for t in tasks
                if self.rank not in self.task_ranks.get(t, ())
            ]
            if missing:
                raise RuntimeError(
                    f'rank {self.rank} got batches of {missing}, which the '
                    f'placement gives to ranks '
                    f'{[self.task_ranks.get(t) for t in missing]}')
            return {t: len(r) for t, r in self.task_ranks.items()}
        device = self.params[0].device if self.params else None
        present = torch.tensor([float(t in tasks) for t in names],
                               device=device)
        dist.all_reduce(present)
        return {t: max(int(n), 1) for t, n in zip(names, present.tolist())}

    def _sync_routers(self) -> None:
        """Every rank learns the routes every task took and the call counts
        (for the balance loss over all tasks and for identical state)."""
        for router in self.routers:
            state = router.step_state()
            dist.all_reduce(state, op=dist.ReduceOp.MAX)
            router.load_step_state(state)

    def _gather_log_vars(self, local: Mapping[str,
                                              Any]) -> Dict[str, torch.Tensor]:
        """Each value averaged over the ranks that logged it; ``loss`` is
        the sum over tasks of their weighted losses plus the aux loss."""
        mine = {k: float(v) for k, v in local.items()}
        gathered: List[Optional[Dict[str, float]]] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        sums: Dict[str, float] = OrderedDict()
        counts: Dict[str, int] = {}
        for part in gathered:
            for k, v in (part or {}).items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        means = OrderedDict((k, v / counts[k]) for k, v in sums.items())
        total = sum(v for k, v in means.items()
                    if k.endswith('/_weighted_loss'))
        total += means.get('router/loss_aux', 0.0)
        out = OrderedDict(loss=torch.tensor(total))
        for task in self.module.task_names:
            for k in sorted(means):
                if k.startswith(
                        f'{task}/') and not k.endswith('/_weighted_loss'):
                    out[k] = torch.tensor(means[k])
        for k, v in means.items():
            if k not in out and not k.endswith('/_weighted_loss'):
                out[k] = torch.tensor(v)
        return out

    def val_step(self, data: Any, task: Optional[str] = None) -> list:
        """The wrapped model's ``val_step`` (task from :func:`use_task`)."""
        return self.module.val_step(data, task or current_task())

    def test_step(self, data: Any, task: Optional[str] = None) -> list:
        """The wrapped model's ``test_step``."""
        return self.module.test_step(data, task or current_task())

    def forward(self, *args, **kwargs) -> Any:
        """Forward of the wrapped model (no synchronisation)."""
        return self.module(*args, **kwargs)


def _all_ranks_finite(flags: torch.Tensor) -> torch.Tensor:
    """The minimum of each 0/1 flag over the ranks of the current default
    group: the task's ranks inside ``default_group`` (every rank for the
    router's loss), so all of them keep or drop the same gradients."""
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return flags
