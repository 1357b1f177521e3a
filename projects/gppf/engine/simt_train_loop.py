"""The SIMT (Single Iteration, Multiple Tasks) train loop.

``train_dataloader`` is a dict keyed by task; each entry is a stock
dataloader config of the task's own library. Example::

    train_cfg = dict(type='SIMTTrainLoop', max_iters=90000,
                     val_interval=5000, placement='all')

Every training iteration draws one batch per task (of this rank's tasks
when distributed) and hands the dict to ``model.train_step``
(:meth:`GPPF.train_step`, or :class:`SIMTDistributedWrapper`'s).
"""
import logging
import time
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from mmengine.dist import all_reduce, get_dist_info
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import LOOPS
from mmengine.runner.loops import IterBasedTrainLoop

from ..datasets import GuardedDataset, ResumableBatchSampler
from ..models.simt_wrapper import SIMTDistributedWrapper
from ..models.task_config import check_task_sets
from .simt_optim_wrapper import use_simt_optim_wrapper
from .task_loaders import (TaskLoaders, build_task_loaders, model_tasks,
                           shard_loader_cfg, task_keys, train_loader_cfg)
from .task_placement import (consumed_samples, format_plan, placement_report,
                             plan_placement, rank_loads, ranks_of)

__all__ = ['SIMTTrainLoop']


def _check_wrapper(model: Any) -> None:
    """Refuse model wrappers other than :class:`SIMTDistributedWrapper`
    (stock ones run one forward and one backward)."""
    if is_model_wrapper(model) and not isinstance(model,
                                                  SIMTDistributedWrapper):
        raise TypeError(
            f'SIMTTrainLoop: the model is wrapped by {type(model).__name__}, '
            'whose train_step runs one forward and one backward and '
            'bypasses GPPF.train_step (per-task backward); plain DDP would '
            'also average gradients over ranks that did not produce them. '
            "Use model_wrapper_cfg=dict(type='SIMTDistributedWrapper')")


@LOOPS.register_module()
class SIMTTrainLoop(IterBasedTrainLoop):
    """Iteration-based loop: every iteration trains every task once.

    It is mmengine's :class:`IterBasedTrainLoop` over a
    :class:`TaskLoaders`, so the runner protocol (``iter``, ``max_iters``,
    ``stop_training``, hooks, validation interval, ``dynamic_intervals``) is
    the stock one. ``outputs`` of ``after_train_iter`` carry ``loss``,
    ``<task>/<loss name>`` and ``<task>/time``.

    Every task's training loader gets a :class:`ResumableBatchSampler` and a
    :class:`GuardedDataset` around its stock ones
    (:func:`train_loader_cfg`): each sample is loaded with a seed of its
    own, a sample that fails to load is replaced, counted
    (``<task>/bad_samples``) and stops the run when too many do, and a
    resumed run at iteration ``k`` skips the first ``k`` batches of every
    task by drawing only their indices (under the placements the original
    run used), in seconds. With :class:`SafeCheckpointHook` restoring the
    process-wide random streams, a killed and resumed run continues exactly
    as the uninterrupted one.

    Distributed (:class:`SIMTDistributedWrapper`), ``placement`` decides
    which ranks run which task (:mod:`.task_placement`); each task's dataset
    is sharded over the ranks that run it (a :class:`TaskShardSampler` in
    place of the config's ``InfiniteSampler`` or ``DefaultSampler``).

    Args:
        runner (Runner): The runner.
        dataloader (dict[str, dict | DataLoader]): One stock dataloader
            config per task (own batch size, ``InfiniteSampler``, pipeline,
            dataset in its library's scope); a built ``DataLoader`` only
            where every rank runs the task.
        max_iters (int): Total iterations.
        val_begin (int): First iteration that may validate. Default: 1.
        val_interval (int): Validation interval. Default: 1000.
        dynamic_intervals (list[tuple[int, int]], optional): As in
            :class:`IterBasedTrainLoop`.
        placement (str | dict): ``'all'`` (default), ``'split'`` or
            ``dict(type='split', costs=dict(<task>=<cost>), replan=True,
            min_gain=0.1, report_interval=50)`` or ``dict(type='split',
            assignment=[[<tasks of rank 0>], ...])``. Ignored on one
            process.
        bad_samples (dict, optional): ``max_retries`` (replacements tried
            for one sample before an error, default 10; 0 raises the first
            failure), ``max_ratio`` (the run stops once more than this
            share of a task's samples failed, default 0.01) and
            ``min_samples`` (only after this many samples of the task were
            drawn, default 100).
    """

    def __init__(self,
                 runner,
                 dataloader: Mapping[str, Any],
                 max_iters: int,
                 val_begin: int = 1,
                 val_interval: int = 1000,
                 dynamic_intervals: Optional[List[Tuple[int, int]]] = None,
                 placement: Union[str, Mapping] = 'all',
                 bad_samples: Optional[Mapping[str, Any]] = None) -> None:
        tasks = model_tasks(runner)
        check_task_sets({
            'model.tasks':
            tasks,
            'train_dataloader':
            task_keys(dataloader, 'train_dataloader')
        })
        _check_wrapper(runner.model)
        use_simt_optim_wrapper(runner)  # before the runner builds it
        self._runner = runner
        self.loader_cfgs = dataloader
        self.rank, world_size = get_dist_info()
        opts = dict(placement) if isinstance(placement, Mapping) else {}
        self.plan = plan_placement(placement, tasks, world_size)
        self.task_ranks = ranks_of(self.plan)
        self.history: List[Tuple[int, List[List[str]]]] = [(0, self.plan)]
        self.report_interval = int(opts.get('report_interval', 50))
        self.replan = (
            bool(opts.get('replan', True)) and opts.get('assignment') is None
            and world_size <= len(tasks))
        self.min_gain = float(opts.get('min_gain', 0.1))
        self.bad_samples = _bad_samples_cfg(bad_samples)
        split = any(len(r) < world_size for r in self.task_ranks.values())
        if world_size > 1:
            if not isinstance(runner.model, SIMTDistributedWrapper):
                raise TypeError(
                    f'SIMTTrainLoop on {world_size} ranks needs '
                    "model_wrapper_cfg=dict(type='SIMTDistributedWrapper'), "
                    f'got {type(runner.model).__name__}')
            runner.model.set_task_ranks(self.task_ranks)
            print_log(
                f'SIMT placement over {world_size} ranks:\n' +
                format_plan(self.plan),
                logger='current')
        if split and self.replan:
            self._check_replannable()
        loaders = self._build_loaders(self.plan, offsets=None)
        length: Union[str, int] = 'max'
        if world_size > 1:  # the same "epoch" length on every rank
            local = torch.tensor(max(len(ld) for ld in loaders.values()))
            all_reduce(local, op='max')  # on the backend's device
            length = int(local)
        task_loaders = TaskLoaders(loaders, length=length)
        super().__init__(
            runner,
            task_loaders,
            max_iters,
            val_begin=val_begin,
            val_interval=val_interval,
            dynamic_intervals=dynamic_intervals)
        self._live_from = 0
        if split:
            task_loaders.before_batch = self._follow_history

    @property
    def tasks(self) -> List[str]:
        """Task names this rank runs, in the order each iteration runs
        them."""
        return self.dataloader.keys()

    # ------------------------------------------------------------ placement
    def _check_replannable(self) -> None:
        """Re-planning continues index streams: InfiniteSampler only."""
        for task, cfg in self.loader_cfgs.items():
            if not isinstance(cfg, Mapping):
                continue
            sampler = (cfg.get('sampler') or {}).get('type', '')
            if isinstance(sampler, str) and sampler.split('.')[-1] not in (
                    'InfiniteSampler', ''):
                raise ValueError(
                    f"train_cfg.placement: replan=True moves tasks between "
                    f"ranks and needs an InfiniteSampler; "
                    f"train_dataloader['{task}'] uses {sampler}. Set "
                    'replan=False or use InfiniteSampler')

    def _build_loaders(self,
                       plan: List[List[str]],
                       offsets: Optional[Mapping[str, int]],
                       start: int = 0) -> Dict[str, Any]:
        """This rank's loaders under ``plan``, sharded over each task's
        ranks; with ``offsets``, only the tasks whose ranks changed are
        rebuilt (continuing their index streams from iteration ``start``),
        the others kept."""
        world_size = len(plan)
        ranks = ranks_of(plan)
        current = getattr(getattr(self, 'dataloader', None), 'loaders', {})
        mine = [
            t for t in task_keys(self.loader_cfgs, 'train_dataloader')
            if t in plan[self.rank]
        ]
        keep = {
            t: current[t]
            for t in mine if offsets is not None and t in current
            and ranks[t] == self.task_ranks.get(t)
        }
        seed = self._runner.seed
        todo = {}
        for task in mine:
            if task in keep:
                continue
            cfg = train_loader_cfg(self.loader_cfgs[task], task, seed,
                                   self.bad_samples['max_retries'])
            if len(ranks[task]) != world_size or offsets:
                cfg = shard_loader_cfg(
                    cfg,
                    ranks[task].index(self.rank),
                    len(ranks[task]),
                    f'train_dataloader[{task!r}]',
                    offset=(offsets or {}).get(task, 0))
            todo[task] = cfg
        built = build_task_loaders(self._runner, todo,
                                   'train_dataloader') if todo else {}
        for task, loader in built.items():
            # DataLoader iterators draw their workers' base seed from this
            # generator instead of the process-wide stream training uses.
            loader.generator = torch.Generator().manual_seed(seed or 0)
            if isinstance(loader.batch_sampler, ResumableBatchSampler):
                loader.batch_sampler.start_at(start)
        return OrderedDict(
            (t, keep[t] if t in keep else built[t]) for t in mine)

    def _follow_history(self, n: int) -> None:
        """Before batch ``n``: every ``report_interval`` batches of live
        training, report on (and maybe re-plan) the placement; then switch
        to the plan in force from ``n`` (a re-plan, or its replay when a
        resumed run redraws its first batches)."""
        if (n >= self._live_from and n > 0 and self.report_interval > 0
                and n % self.report_interval == 0):
            self._report_placement(n)
        plan = next((p for start, p in reversed(self.history) if start <= n),
                    self.plan)
        if plan == self.plan:
            return
        sizes = {
            t:
            int(cfg['batch_size'])
            if isinstance(cfg, Mapping) else int(cfg.batch_size)
            for t, cfg in self.loader_cfgs.items()
        }
        offsets = consumed_samples(self.history, n, sizes)
        loaders = self._build_loaders(plan, offsets, start=n)
        self.plan, self.task_ranks = plan, ranks_of(plan)
        self.runner.model.set_task_ranks(self.task_ranks)
        self.dataloader.set_loaders(loaders)
        print_log(
            f'SIMT placement from iteration {n}:\n' + format_plan(plan),
            logger='current')

    def run(self) -> Any:
        """Train from ``iter`` (0, or the resumed iteration) to
        ``max_iters``: mmengine's iteration loop, except that a resumed run
        skips the batches already trained at the index level (following
        the placement history of the checkpoint) instead of loading them,
        and that the bad samples each batch reports are counted."""
        self._live_from = self._iter
        stored = self.runner.message_hub.get_info('simt_placement_history')
        if stored and len(self.plan) > 1:
            history = [(int(s), [list(ts) for ts in p]) for s, p in stored]
            if len(history[0][1]) != len(self.plan):
                raise ValueError(
                    f'the checkpoint was trained on {len(history[0][1])} '
                    f'ranks with placement history {history}; this run has '
                    f'{len(self.plan)} ranks')
            self.history = history
        self.runner.call_hook('before_train')
        self.runner.call_hook('before_train_epoch')
        batches = iter(self.dataloader)
        if self._iter > 0:
            start = time.perf_counter()
            batches.skip(self._iter)
            print_log(
                f'resumed at iteration {self._iter}: skipped as many '
                'batches of every task without loading them '
                f'({time.perf_counter() - start:.2f}s)',
                logger='current')
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            data_batch = self._count_bad_samples(next(batches))
            self.run_iter(data_batch)
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None
                    and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0
                         or self._iter == self._max_iters)):
                self.runner.val_loop.run()
        self.runner.call_hook('after_train_epoch')
        self.runner.call_hook('after_train')
        return self.runner.model

    def _count_bad_samples(self, data: Dict[str, Any]) -> Dict[str, Any]:
        """Take the failures :class:`GuardedDataset` reported out of each
        task's batch, count them per task (``<task>/bad_samples`` scalar,
        kept in the checkpoint) and stop the run when a task's share of
        failed samples exceeds ``bad_samples.max_ratio``."""
        hub = self.runner.message_hub
        counts = hub.get_info('simt_bad_samples') or {}
        changed = False
        for task, batch in data.items():
            if not isinstance(batch, dict) or GuardedDataset.KEY not in batch:
                continue
            reports = batch.pop(GuardedDataset.KEY)
            failures = [f for r in reports for f in r.split('\n') if f]
            bad, seen, last = counts.get(task, (0, 0, []))
            bad, seen = bad + len(failures), seen + len(reports) + len(
                failures)
            last = (list(last) + failures)[-3:]
            counts[task] = (bad, seen, last)
            changed = True
            if bad:
                hub.update_scalar(f'train/{task}/bad_samples', bad)
            cfg = self.bad_samples
            if seen >= cfg['min_samples'] and bad > cfg['max_ratio'] * seen:
                raise RuntimeError(
                    f"train_dataloader['{task}']: {bad} of the {seen} "
                    f'samples drawn so far failed to load '
                    f'({bad / seen:.1%}, more than train_cfg.bad_samples.'
                    f'max_ratio={cfg["max_ratio"]:.1%}), at iteration '
                    f'{self._iter}. The last ones:\n' + '\n'.join(last) +
                    '\nRepair or remove them, or raise the limit')
        if changed:
            hub.update_info('simt_bad_samples', counts)
        return data

    def _report_placement(self, n: int) -> None:
        """Log each rank's measured load; warn when a rank mostly idles;
        re-plan from batch ``n`` when the measured costs give a faster plan
        (the same decision on every rank, and in a resumed run: the logged
        task times are gathered over ranks and kept in the checkpoint)."""
        hub = self.runner.message_hub
        costs = {}
        for task in self.task_ranks:
            buf = hub.log_scalars.get(f'train/{task}/time')
            if buf is None:
                return
            costs[task] = max(float(buf.mean(self.report_interval)), 1e-9)
        report = placement_report(
            self.plan, costs, self.replan, min_gain=self.min_gain)
        print_log(
            'SIMT placement, measured task time per iteration:\n' +
            report['text'],
            logger='current')
        if report['idle']:
            print_log(
                f'SIMT placement: ranks {report["idle"]} idle more than half '
                "of each iteration; balance with the tasks' batch sizes, "
                'placement.costs or placement.assignment, or use '
                "placement='all'",
                logger='current',
                level=logging.WARNING)
        if report['better'] is not None:
            new = max(rank_loads(report['better'], costs))
            print_log(
                'SIMT placement: re-planned with the measured costs '
                f'({new:.3f}s vs {max(report["loads"]):.3f}s per '
                'iteration)',
                logger='current',
                level=logging.WARNING)
            self.history.append((n, report['better']))
            hub.update_info('simt_placement_history',
                            [[s, p] for s, p in self.history])


def _bad_samples_cfg(cfg: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``train_cfg.bad_samples`` with its defaults, checked."""
    out = dict(max_retries=10, max_ratio=0.01, min_samples=100)
    unknown = set(cfg or {}) - set(out)
    if unknown:
        raise KeyError(f'train_cfg.bad_samples: unknown keys '
                       f'{sorted(unknown)}; known: {sorted(out)}')
    out.update(cfg or {})
    if int(out['max_retries']) < 0 or int(
            out['min_samples']) < 0 or not (0 <= float(out['max_ratio']) <= 1):
        raise ValueError('train_cfg.bad_samples needs max_retries >= 0, '
                         f'min_samples >= 0 and 0 <= max_ratio <= 1, got '
                         f'{out}')
    return out
