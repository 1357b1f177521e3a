"""Task placement over ranks: plans, errors, the measured-cost report,
continuing a moved task's index stream."""
import itertools

import pytest

from projects.gppf.engine.task_placement import (consumed_samples, lpt_plan,
                                                 placement_report,
                                                 plan_placement, rank_loads,
                                                 ranks_of)

TASKS = ['det', 'seg', 'cls', 'cls21k']


def test_all_runs_every_task_on_every_rank():
    assert plan_placement('all', TASKS, 3) == [TASKS] * 3


def test_split_packs_by_cost_longest_first():
    costs = dict(det=5.0, seg=4.0, cls=3.0, cls21k=3.0)
    plan = plan_placement(dict(type='split', costs=costs), TASKS, 2)
    # det -> 0, seg -> 1, cls -> 1 (4 < 5), cls21k -> 0 (5 < 7): 8 vs 7.
    assert plan == [['det', 'cls21k'], ['seg', 'cls']]
    assert rank_loads(plan, costs) == [8.0, 7.0]
    assert ranks_of(plan) == dict(det=[0], cls21k=[0], seg=[1], cls=[1])
    # Equal costs (no costs given): round robin in name order.
    assert plan_placement('split', TASKS, 2) == [['det', 'cls'],
                                                 ['seg', 'cls21k']]
    assert plan_placement('split', TASKS, 1) == [TASKS]


def test_lpt_is_within_four_thirds_of_the_best_makespan():
    # The classic LPT worst case for 2 machines: 3,3,2,2,2 -> 7 vs best 6.
    costs = {f't{i}': c for i, c in enumerate([3, 3, 2, 2, 2])}
    plan = lpt_plan(costs, 2)
    assert max(rank_loads(plan, costs)) == 7 <= 4 / 3 * 6


def test_explicit_assignment_may_replicate_tasks():
    plan = plan_placement(
        dict(
            type='split',
            assignment=[['det'], ['det'], ['seg', 'cls'], ['cls21k']]), TASKS,
        4)
    assert ranks_of(plan)['det'] == [0, 1]


@pytest.mark.parametrize('placement,world,match', [
    ('split', 5, 'would leave ranks idle'),
    ('ring', 2, "must be 'all' or 'split'"),
    (dict(type='split', costs=dict(det=1)), 2, 'missing'),
    (dict(type='split', costs=dict(det=1, seg=1, cls=0,
                                   cls21k=1)), 2, 'must be > 0'),
    (dict(type='split', assignment=[['det', 'seg', 'cls'], []
                                    ]), 2, 'leaves rank 1 without a task'),
    (dict(type='split', assignment=[['det', 'seg'], ['cls']
                                    ]), 2, r"runs no rank on \['cls21k'\]"),
    (dict(type='split', assignment=[['det', 'sge'], ['cls', 'cls21k']
                                    ]), 2, 'unknown or repeated'),
    (dict(type='split', assignment=[TASKS]), 2, '1 entries for 2 ranks'),
    (dict(type='split', speed=1), 2, 'unknown placement keys'),
])
def test_bad_placements_are_named(placement, world, match):
    with pytest.raises(ValueError, match=match):
        plan_placement(placement, TASKS, world)


def test_report_flags_idle_ranks_and_proposes_a_faster_plan():
    plan = [['det', 'seg'], ['cls', 'cls21k']]  # planned with equal costs
    measured = dict(det=4.0, seg=4.0, cls=1.0, cls21k=1.0)
    report = placement_report(plan, measured)
    assert report['loads'] == [8.0, 2.0]
    assert report['idle'] == [1]
    assert 'idle 75%' in report['text']
    assert max(rank_loads(report['better'], measured)) == 5.0
    # No proposal when the user fixed the assignment or the gain is small.
    assert placement_report(plan, measured, can_replan=False)['better'] is None
    balanced = dict(det=1.0, seg=1.0, cls=1.0, cls21k=1.05)
    report = placement_report(plan, balanced)
    assert report['better'] is None and report['idle'] == []


def test_consumed_samples_follows_the_plan_history():
    history = [(0, [['det', 'cls'], ['seg']]), (3, [['det'], ['seg', 'cls']]),
               (5, [['det'], ['det']])]  # a task may run on every rank
    sizes = dict(det=2, seg=4, cls=8)
    assert consumed_samples(history, 0, sizes) == dict(det=0, seg=0, cls=0)
    # 3 iterations of the first plan, 2 of the second, 1 of the third.
    assert consumed_samples(history, 6, sizes) == dict(
        det=3 * 2 + 2 * 2 + 1 * 2 * 2, seg=5 * 4, cls=5 * 8)


def test_moved_task_continues_its_index_stream():
    """Shard r of n with an offset reads the stream positions after it,
    so the ranks that take a task over draw what nobody drew yet."""
    from mmengine.dataset import InfiniteSampler
    from mmengine.registry import DATA_SAMPLERS
    from torch.utils.data import DataLoader

    from projects.gppf.engine.task_loaders import shard_loader_cfg

    data = list(range(20))
    stream = list(itertools.islice(iter(InfiniteSampler(data, seed=3)), 40))
    cfg = dict(batch_size=2, sampler=dict(type='InfiniteSampler', seed=3))

    def loader(rank, world_size, offset=0):
        sharded = shard_loader_cfg(cfg, rank, world_size, 'x', offset)
        sampler = DATA_SAMPLERS.build(
            sharded['sampler'], default_args=dict(dataset=data))
        return DataLoader(data, batch_size=2, sampler=sampler)

    # Rank 0 alone drew 3 batches (6 positions); then 2 ranks take over.
    first = loader(0, 1)
    drawn = [i for _, b in zip(range(3), first) for i in b.tolist()]
    after = []
    for rank in range(2):
        ld = loader(rank, 2, offset=6)
        after.append([i for _, b in zip(range(2), ld) for i in b.tolist()])
    assert drawn == stream[:6]
    assert after[0] == stream[6:14:2] and after[1] == stream[7:14:2]
    assert sorted(drawn + after[0] + after[1]) == sorted(stream[:14])
    with pytest.raises(TypeError, match='only an InfiniteSampler'):
        shard_loader_cfg(
            dict(batch_size=2, sampler=dict(type='DefaultSampler')),
            0,
            1,
            'x',
            offset=2)
