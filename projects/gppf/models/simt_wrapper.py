"""Data-parallel SIMT over ranks that may run different tasks.

Stock ``DistributedDataParallel`` reduces gradients during one backward and
divides by the world size. SIMT runs one backward per task, ranks may run
different tasks (``split`` placement) and tasks use different lego units, so
DDP would either fail on parameters a rank did not use or average zeros in
for them (PyTorch issue 41101). Here every task's backward accumulates
locally and the SIMT optimizer wrapper synchronises once, before the
optimizer step (``SIMTOptimWrapper.end_iteration``, see
:mod:`projects.gppf.utils.dist_sync`).

The rule: every loss term is divided by the number of ranks that computed
it (a task's loss by the ranks that ran the task, the router's balance loss,
which every rank computes from the routes of all ranks, by the world size),
then gradients are summed over the ranks that produced one. The result is
the gradient of the SIMT objective over the union of all ranks' data: a
task head or a lego unit that only the ranks of one task use gets the mean
of those ranks' gradients (exactly one rank's gradient if one rank ran it),
and a parameter shared by tasks gets the sum over tasks of the per-task
means, as in a single process.

The distributed step is :meth:`GPPF.train_step` itself; the wrapper hands
it a :class:`RankStep`, whose methods below answer, in the order the step
asks, what only the wrapper knows.
"""
import time
from collections import OrderedDict
from typing import Any, ContextManager, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.optim import OptimWrapper
from mmengine.registry import MODEL_WRAPPERS

from ..utils.dist_sync import NormStatsSync, default_group
from .gppf import SingleProcessStep
from .lego.router import TaskRouter

__all__ = ['SIMTDistributedWrapper', 'RankStep']


@MODEL_WRAPPERS.register_module()
class SIMTDistributedWrapper(nn.Module):
    """Distributed wrapper of a :class:`GPPF` model for the SIMT loops.

    Set it with ``model_wrapper_cfg=dict(type='SIMTDistributedWrapper')``
    (the GPPF configs do); mmengine's runner builds it when launched with a
    distributed launcher. :class:`SIMTTrainLoop` tells it which ranks run
    which task (:meth:`set_task_ranks`).

    Per training iteration, on every rank (:meth:`GPPF.train_step` with a
    :class:`RankStep`): each of its tasks forward and backward inside the
    task's process group, so stock heads' collectives reach exactly the
    ranks running the task, the loss divided by those ranks (a task whose
    loss or gradient is not finite on one of its ranks is skipped on all of
    them, see :class:`NonFiniteGuard`); the router's routes and call counts
    are exchanged and the balance loss backward; the SIMT optimizer wrapper
    counts the iteration and, when due, sums the gradients over the ranks
    (before unscaling and clipping) and steps; the norms' running
    statistics are averaged; the logged values are gathered so that every
    rank logs every task.

    Args:
        module (nn.Module): The :class:`GPPF` model.
        sync_norm_stats (bool): Average batch-norm running statistics over
            the ranks that updated them, every iteration (see
            :class:`NormStatsSync`). Default: True.

    The size of the gradient buckets is the optimizer wrapper's
    ``bucket_size_mb``. Replicas must start equal: mmengine's runner
    broadcasts every ``state_dict()`` value from rank 0 when training starts
    and loads the same checkpoint on every rank for testing; outside the
    runner, build the model with the same seed on every rank.
    """

    def __init__(self,
                 module: nn.Module,
                 sync_norm_stats: bool = True) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError('SIMTDistributedWrapper needs an initialised '
                               'process group (launch with tools/'
                               'dist_train.sh or --launcher pytorch)')
        for name in ('train_step', 'task_backward', 'aux_backward'):
            if not callable(getattr(module, name, None)):
                raise TypeError('SIMTDistributedWrapper wraps a SIMT model '
                                f'(GPPF); {type(module).__name__} has no '
                                f'{name}()')
        self.module = module
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.routers = [
            m for m in module.modules() if isinstance(m, TaskRouter)
        ]
        self.norm_stats = NormStatsSync(module) if sync_norm_stats else None
        self.task_ranks: Optional[Dict[str, List[int]]] = None
        self.task_groups: Dict[str, Any] = {}
        #: ``wait`` (s), ``time`` (s) and ``bytes`` of the last iteration's
        #: collectives (for benchmarks).
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
        holds a batch of each): :meth:`GPPF.train_step` with this rank's
        :class:`RankStep`. Returns the log variables of every task,
        averaged over the ranks that ran it, on every rank."""
        if not isinstance(data, Mapping):
            raise TypeError('SIMTDistributedWrapper.train_step expects a '
                            'dict of batches keyed by task')
        step = RankStep(self, self.ranks_per_task(list(data)))
        return self.module.train_step(data, optim_wrapper, step=step)

    def ranks_per_task(self, tasks: List[str]) -> Dict[str, int]:
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
        param = next(self.module.parameters(), None)
        present = torch.tensor([float(t in tasks) for t in names],
                               device=None if param is None else param.device)
        dist.all_reduce(present)
        return {t: max(int(n), 1) for t, n in zip(names, present.tolist())}

    def val_step(self, data: Any, task: Optional[str] = None) -> list:
        """The wrapped model's ``val_step`` (the task as it resolves it)."""
        return self.module.val_step(data, task)

    def test_step(self, data: Any, task: Optional[str] = None) -> list:
        """The wrapped model's ``test_step``."""
        return self.module.test_step(data, task)

    def forward(self, *args, **kwargs) -> Any:
        """Forward of the wrapped model (no synchronisation)."""
        return self.module(*args, **kwargs)


class RankStep(SingleProcessStep):
    """One rank's part of a distributed SIMT step: what
    :meth:`GPPF.train_step` asks, answered for this rank, in the order it
    asks.

    Args:
        wrapper (SIMTDistributedWrapper): The wrapper (process groups,
            routers, norm statistics).
        ranks (dict[str, int]): Ranks running each task this iteration.
    """

    def __init__(self, wrapper: SIMTDistributedWrapper,
                 ranks: Mapping[str, int]) -> None:
        self.wrapper = wrapper
        self.ranks = ranks
        self.wait_time = 0.0
        self.buffer_time = 0.0
        self.buffer_bytes = 0

    def task_scope(self, task: str) -> ContextManager:
        """The task's process group as the default one: the collectives of
        its stock head and norms (mmdet's ``reduce_mean``,
        ``SyncBatchNorm``) and of :meth:`agree` reach its ranks only."""
        return default_group(self.wrapper.task_groups.get(task))

    def loss_scale(self, task: Optional[str]) -> float:
        """1 / the ranks that computed the loss: the task's ranks, every
        rank for the router's balance loss (``None``)."""
        if task is None:
            return 1.0 / self.wrapper.world_size
        return 1.0 / self.ranks[task]

    def agree(self, flags: torch.Tensor) -> torch.Tensor:
        """The minimum of each 0/1 flag over the ranks of the current
        default group (the task's inside :meth:`task_scope`, every rank for
        the router's loss), so all of them keep or drop the same
        gradients."""
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return flags

    def exchange_routes(self) -> None:
        """Every rank learns the routes every task took and the call counts
        (for the balance loss over all tasks and for identical state). The
        first collective over all ranks: it waits for the slowest."""
        start = time.perf_counter()
        for router in self.wrapper.routers:
            state = router.step_state()
            dist.all_reduce(state, op=dist.ReduceOp.MAX)
            router.load_step_state(state)
        self.wait_time = time.perf_counter() - start

    def sync_buffers(self) -> None:
        """Average the norms' running statistics over the ranks that
        updated them (:class:`NormStatsSync`)."""
        if self.wrapper.norm_stats is None:
            return
        start = time.perf_counter()
        self.buffer_bytes = self.wrapper.norm_stats.sync()
        self.buffer_time = time.perf_counter() - start

    def gather(self, losses: Mapping[str, torch.Tensor],
               log_vars: Mapping[str, torch.Tensor],
               optim_wrapper: OptimWrapper) -> Dict[str, torch.Tensor]:
        """Each value averaged over the ranks that logged it, on every rank,
        with ``dist/wait_time``, ``dist/sync_time`` and ``dist/sync_mb``;
        ``loss`` is the sum over tasks (and the router) of their averaged
        weighted losses."""
        grads = getattr(optim_wrapper, 'last_sync', None) or {}
        sync_time = grads.get('time', 0.0) + self.buffer_time
        sync_bytes = grads.get('bytes', 0) + self.buffer_bytes
        self.wrapper.last_sync = dict(
            wait=self.wait_time, time=sync_time, bytes=float(sync_bytes))
        mine = dict(
            losses={
                k: float(v)
                for k, v in losses.items()
            },
            log_vars={
                k: float(v)
                for k, v in log_vars.items()
            })
        mine['log_vars'].update({
            'dist/wait_time': self.wait_time,
            'dist/sync_time': sync_time,
            'dist/sync_mb': sync_bytes / 2**20
        })
        gathered: List[Optional[dict]] = [None] * self.wrapper.world_size
        dist.all_gather_object(gathered, mine)
        parts = [p for p in gathered if p]
        total = sum(_means([p['losses'] for p in parts]).values())
        means = _means([p['log_vars'] for p in parts])
        out = OrderedDict(loss=torch.tensor(total))
        for task in self.wrapper.module.task_names:
            for k in sorted(means):
                if k.startswith(f'{task}/'):
                    out[k] = torch.tensor(means[k])
        for k, v in means.items():
            if k not in out:
                out[k] = torch.tensor(v)
        return out


def _means(parts: List[Mapping[str, float]]) -> Dict[str, float]:
    """Each key's mean over the parts that have it (in order of first
    appearance)."""
    sums: Dict[str, float] = OrderedDict()
    counts: Dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
    return OrderedDict((k, v / counts[k]) for k, v in sums.items())
