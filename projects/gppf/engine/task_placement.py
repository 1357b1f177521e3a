"""Which ranks run which tasks in a distributed SIMT iteration.

``'all'``: every rank runs every task, each on its shard of every dataset
(the global batch of a task is ``world_size x batch_size``).

``'split'``: each rank runs a subset of the tasks, each task's dataset is
sharded over the ranks that run it (global batch ``ranks x batch_size``).
Policy: without an explicit ``assignment``, the tasks are packed onto the
ranks by longest-processing-time first (largest cost to the least loaded
rank, ties to the lower rank), which keeps the slowest rank within 4/3 of
the best makespan. Costs are the configured seconds (or any relative unit)
per iteration of each task at its batch size; without them every task costs
1. Every ``report_interval`` iterations the train loop logs each rank's
measured load (the tasks' times, gathered over ranks, so every rank sees
the same figures) and warns about ranks idle more than half the time. With
``replan=True`` (default, not with an ``assignment``) it switches to the
plan the measured costs give when that cuts the slowest rank's load by more
than ``min_gain`` (10 %); a task that moves continues its sampler's index
stream where its previous ranks stopped (:func:`consumed_samples`), and the
plan history is kept in the checkpoint so that a resumed run replays it.
"""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    'plan_placement', 'lpt_plan', 'ranks_of', 'rank_loads', 'format_plan',
    'placement_report', 'consumed_samples', 'SPLIT_KEYS'
]

SPLIT_KEYS = ('costs', 'assignment', 'report_interval', 'replan', 'min_gain')

Plan = List[List[str]]


def lpt_plan(costs: Mapping[str, float], world_size: int) -> Plan:
    """Longest-processing-time-first packing of tasks onto ranks.

    Args:
        costs (dict[str, float]): Cost per task (> 0).
        world_size (int): Ranks; at most the number of tasks.

    Returns:
        list[list[str]]: Tasks per rank.
    """
    plan: Plan = [[] for _ in range(world_size)]
    loads = [0.0] * world_size
    for task in sorted(costs, key=lambda t: (-costs[t], t)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        plan[rank].append(task)
        loads[rank] += costs[task]
    return plan


def ranks_of(plan: Plan) -> Dict[str, List[int]]:
    """Ranks per task of a plan."""
    out: Dict[str, List[int]] = {}
    for rank, tasks in enumerate(plan):
        for task in tasks:
            out.setdefault(task, []).append(rank)
    return out


def rank_loads(plan: Plan, costs: Mapping[str, float]) -> List[float]:
    """Each rank's summed task cost."""
    return [sum(costs[t] for t in tasks) for tasks in plan]


def format_plan(plan: Plan,
                costs: Optional[Mapping[str, float]] = None) -> str:
    """One line per rank: its tasks (and load)."""
    lines = []
    for rank, tasks in enumerate(plan):
        load = ''
        if costs is not None:
            load = f' (load {sum(costs[t] for t in tasks):.3g})'
        lines.append(f'rank {rank}: {", ".join(tasks)}{load}')
    return '\n'.join(lines)


def _check_costs(costs: Mapping[str, float],
                 tasks: Sequence[str]) -> Dict[str, float]:
    unknown = sorted(set(costs) - set(tasks))
    missing = sorted(set(tasks) - set(costs))
    if unknown or missing:
        raise ValueError(f'placement costs must name exactly the tasks '
                         f'{list(tasks)}: unknown {unknown}, missing '
                         f'{missing}')
    out = {}
    for task in tasks:
        value = float(costs[task])
        if not value > 0:
            raise ValueError(f'placement cost of {task!r} must be > 0, got '
                             f'{costs[task]!r}')
        out[task] = value
    return out


def plan_placement(placement: Union[str, Mapping], tasks: Sequence[str],
                   world_size: int) -> Plan:
    """The tasks each rank runs.

    Args:
        placement (str | dict): ``'all'``, ``'split'`` or a dict with
            ``type`` and, for ``'split'``, optional ``costs`` (dict per
            task) or ``assignment`` (list, per rank, of task lists; a task
            may run on several ranks).
        tasks (list[str]): The model's tasks.
        world_size (int): Number of ranks.

    Returns:
        list[list[str]]: Tasks per rank, in the model's task order.

    Raises:
        ValueError: Unknown placement type; a ``split`` with more ranks than
            tasks and no assignment; an assignment that leaves a rank idle,
            misses a task or names an unknown one.
    """
    cfg = {
        'type': placement
    } if isinstance(placement, str) else dict(placement)
    kind = cfg.pop('type', None)
    order = {t: i for i, t in enumerate(tasks)}
    if kind == 'all':
        if cfg:
            raise ValueError(f"placement 'all' takes no {sorted(cfg)}")
        return [list(tasks) for _ in range(world_size)]
    if kind != 'split':
        raise ValueError(f"placement type must be 'all' or 'split', got "
                         f'{kind!r}')
    extra = cfg.keys() - set(SPLIT_KEYS)
    if extra:
        raise ValueError(f'unknown placement keys {sorted(extra)}; split '
                         f'takes {", ".join(SPLIT_KEYS)}')
    assignment = cfg.get('assignment')
    if assignment is not None:
        if cfg.get('costs') is not None:
            raise ValueError('give placement.costs or placement.assignment, '
                             'not both')
        plan = [list(ts) for ts in assignment]
        if len(plan) != world_size:
            raise ValueError(f'placement.assignment has {len(plan)} entries '
                             f'for {world_size} ranks')
        for rank, ts in enumerate(plan):
            if not ts:
                raise ValueError(f'placement.assignment leaves rank {rank} '
                                 'without a task')
            unknown = [t for t in ts if t not in order]
            if unknown or len(set(ts)) != len(ts):
                raise ValueError(f'placement.assignment[{rank}]={ts}: unknown '
                                 f'or repeated tasks (tasks: {list(tasks)})')
        missing = [t for t in tasks if not any(t in ts for ts in plan)]
        if missing:
            raise ValueError(f'placement.assignment runs no rank on '
                             f'{missing}')
    else:
        if world_size > len(tasks):
            raise ValueError(
                f"placement 'split' with {world_size} ranks and "
                f'{len(tasks)} tasks would leave ranks idle: give '
                'placement.assignment (a list per rank of its tasks; a task '
                "may run on several ranks) or use placement='all'")
        costs = _check_costs(
            cfg.get('costs') or {t: 1.0
                                 for t in tasks}, tasks)
        plan = lpt_plan(costs, world_size)
    return [sorted(ts, key=order.__getitem__) for ts in plan]


def placement_report(plan: Plan,
                     costs: Mapping[str, float],
                     can_replan: bool = True,
                     idle_fraction: float = 0.5,
                     min_gain: float = 0.1) -> Dict[str, object]:
    """Judge a running plan by the measured task costs.

    Args:
        plan (list[list[str]]): Tasks per rank.
        costs (dict[str, float]): Measured seconds per iteration per task.
        can_replan (bool): Whether to propose an LPT plan (not when the
            user gave the assignment, or with more ranks than tasks).
        idle_fraction (float): A rank whose load is below
            ``1 - idle_fraction`` of the slowest rank's is reported idle.
        min_gain (float): Propose a plan only if it cuts the slowest rank's
            load by more than this fraction.

    Returns:
        dict: ``loads`` (per rank), ``idle`` (ranks), ``better`` (a plan or
        ``None``) and ``text`` (lines to log).
    """
    loads = rank_loads(plan, costs)
    slowest = max(loads)
    lines = [
        f'rank {r}: {", ".join(ts)} {loads[r]:.3f}s '
        f'(idle {100 * (1 - loads[r] / slowest):.0f}%)'
        for r, ts in enumerate(plan)
    ]
    idle = [
        r for r, load in enumerate(loads)
        if load < (1 - idle_fraction) * slowest
    ]
    better = None
    if can_replan and len(plan) <= len(costs):
        candidate = lpt_plan(costs, len(plan))
        if max(rank_loads(candidate, costs)) < (1 - min_gain) * slowest:
            better = candidate
    return dict(loads=loads, idle=idle, better=better, text='\n'.join(lines))


def consumed_samples(history: Sequence[Tuple[int, Plan]], upto: int,
                     batch_sizes: Mapping[str, int]) -> Dict[str, int]:
    """Index-stream positions each task's ranks used before iteration
    ``upto``.

    Args:
        history (list[tuple[int, plan]]): ``(first iteration, plan)`` of
            every plan in force, in order, the first starting at 0.
        upto (int): Iteration.
        batch_sizes (dict[str, int]): Per-rank batch size of each task.

    Returns:
        dict[str, int]: Per task, ``sum over plans of iterations x ranks
        running the task x batch size``.
    """
    out = {task: 0 for task in batch_sizes}
    for i, (start, plan) in enumerate(history):
        end = history[i + 1][0] if i + 1 < len(history) else upto
        iters = max(min(end, upto) - start, 0)
        for task, ranks in ranks_of(plan).items():
            out[task] += iters * len(ranks) * batch_sizes[task]
    return out
