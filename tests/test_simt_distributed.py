"""Distributed SIMT on 2 gloo processes (CPU, spawned, bounded time).

The reference is one process that sees the union of the ranks' data: the
same model, the same batches, ``GPPF.train_step``. Both run in float64
(:mod:`_float64`): the ranks sum gradients in another order than one
process, which float32 rounding (amplified by the steps) makes visible.
"""
import copy
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _dist_common import run_ranks
from _float64 import assert_close_to_scale, to_float64
from _simt_common import (TASKS, dataloaders, make_demo_data, model_cfg,
                          runner_cfg)
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS, MODELS
from mmengine.runner import Runner

import projects.gppf  # noqa: F401
import projects.gppf.engine  # noqa: F401
from projects.gppf.engine import SIMTOptimWrapper
from projects.gppf.engine.task_loaders import shard_loader_cfg
from projects.gppf.engine.task_placement import plan_placement, ranks_of
from projects.gppf.models import SIMTDistributedWrapper
from projects.gppf.models.lego.layers import LegoBatchNorm
from projects.gppf.utils.dist_sync import NormStatsSync, default_group

pytestmark = pytest.mark.dist

ITERS = 2


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp('gppf_dist'))


# ------------------------------------------------------------------ helpers
class _RecordingOptimWrapper(SIMTOptimWrapper):
    """Keeps the (synchronised, unclipped) gradients of its first step."""

    def step(self, **kwargs):
        if not hasattr(self, 'grads'):
            self.grads = {
                n: p.grad.clone()
                for n, p in self.named_params if p.grad is not None
            }
        super().step(**kwargs)


def _build(bn_eval: bool, disjoint: bool):
    """The tiny lego GPPF in float64; ``disjoint`` also turns on ``with_cp``
    and accumulates gradients over 2 iterations (one optimizer step)."""
    torch.manual_seed(0)
    cfg = model_cfg('lego')
    cfg['backbone']['with_cp'] = disjoint
    model = MODELS.build(cfg)
    model.init_weights()
    to_float64(model)
    model.train()
    if bn_eval:  # per-sample losses: a batch split over ranks is exact
        for m in model.modules():
            if isinstance(getattr(m, 'running_mean', None), torch.Tensor):
                m.eval()
    if disjoint:  # seg on units {2, 3}, the others on {0, 1}, every layer
        router = model.backbone.router
        for task in model.task_names:
            units = [2, 3] if task == 'fmnist_seg' else [0, 1]
            router.set_route(task, torch.tensor([units] * router.num_layers))
    optim = _RecordingOptimWrapper(
        torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4),
        clip_grad=dict(max_norm=1.0),
        accumulative_counts=2 if disjoint else 1)
    optim.named_params = list(model.named_parameters())
    return model, optim


def _batches(root: Path):
    """One real batch of 4 per task, in the model's task order (the same
    on every rank: the sampler is not sharded)."""
    out = OrderedDict()
    for task, cfg in dataloaders(root, 'train', 4, False).items():
        loader = Runner.build_dataloader(
            shard_loader_cfg(cfg, 0, 1, task), seed=0)
        out[task] = next(iter(loader))
    return out


def _shard(batch: dict, index: int, count: int) -> dict:
    n = len(batch['inputs']) // count
    return {k: v[index * n:(index + 1) * n] for k, v in batch.items()}


def _shared_batches(placement, world_size: int) -> bool:
    """Whether some task's batch is split over several ranks (the case
    that needs batch norms in eval mode for an exact comparison)."""
    ranks = ranks_of(plan_placement(placement, list(TASKS), world_size))
    return any(len(r) > 1 for r in ranks.values())


def _worker(rank, world_size, root, placement, disjoint, out_dir):
    model, optim = _build(_shared_batches(placement, world_size), disjoint)
    wrapper = SIMTDistributedWrapper(model)
    task_ranks = ranks_of(
        plan_placement(placement, model.task_names, world_size))
    wrapper.set_task_ranks(task_ranks)
    full = _batches(Path(root))
    data = OrderedDict(
        (task,
         _shard(batch, task_ranks[task].index(rank), len(task_ranks[task])))
        for task, batch in full.items() if rank in task_ranks[task])
    logs = [{
        k: float(v)
        for k, v in wrapper.train_step(copy.deepcopy(data), optim).items()
    } for _ in range(ITERS)]
    torch.save(
        dict(
            tasks=list(data),
            grads=optim.grads,
            state=model.state_dict(),
            num_calls=list(model.backbone.router.num_calls),
            logs=logs),
        Path(out_dir) / f'rank{rank}.pt')


def _reference(root: Path, bn_eval: bool, disjoint: bool):
    model, optim = _build(bn_eval, disjoint)
    full = _batches(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same summation order
    try:
        logs = [{
            k: float(v)
            for k, v in model.train_step(copy.deepcopy(full), optim).items()
        } for _ in range(ITERS)]
    finally:
        torch.set_num_threads(threads)
    return dict(
        grads=optim.grads,
        state=model.state_dict(),
        num_calls=list(model.backbone.router.num_calls),
        logs=logs)


# -------------------------------------------------------------------- tests
# 3 ranks: det on a 2-rank subgroup (FCOS's reduce_mean runs in it).
SUBGROUP = dict(
    type='split',
    assignment=[['mnist_det'], ['mnist_det'], ['fmnist_seg', 'fmnist_cls']])


@pytest.mark.data
@pytest.mark.parametrize('placement,disjoint,world_size',
                         [('all', False, 2), ('split', False, 2),
                          ('split', True, 2), (SUBGROUP, False, 3)])
def test_ranks_update_like_one_process(demo_root, tmp_path, placement,
                                       disjoint, world_size):
    """2 ranks (every task on both, or tasks split over them) and 3 ranks
    (det on a 2-rank subgroup) step exactly like one process on the union
    of their data: the same synchronised gradients (before clipping),
    parameters after 2 SGD+momentum+weight decay+clipping steps (float64,
    see :func:`_rel`), router call counts and logged losses. With
    ``disjoint`` routes, rank 1's task uses lego units no task of rank 0
    uses: no hang (the ranks finish within the timeout); that case also
    checkpoints activations (``with_cp``) and accumulates 2 iterations into
    one step (synchronised once)."""
    run_ranks(
        _worker,
        world_size,
        args=(str(demo_root), placement, disjoint, str(tmp_path)),
        timeout=300,
        err_dir=str(tmp_path / 'errors'))
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(world_size)]
    ref = _reference(demo_root, _shared_batches(placement, world_size),
                     disjoint)
    rel = _rel(placement, world_size)
    if placement == 'split':  # the equal-cost plan of 3 tasks on 2 ranks
        assert ranks[0]['tasks'] == ['mnist_det', 'fmnist_cls']
        assert ranks[1]['tasks'] == ['fmnist_seg']
    elif placement == 'all':
        assert ranks[0]['tasks'] == ranks[1]['tasks'] == list(TASKS)
    else:
        assert [r['tasks'] for r in ranks] == SUBGROUP['assignment']

    # Every rank ends with the same gradients and state as the other ...
    for r in ranks[1:]:
        assert r['grads'].keys() == ranks[0]['grads'].keys()
        for name, grad in r['grads'].items():
            assert torch.equal(grad, ranks[0]['grads'][name]), name
        for name, value in r['state'].items():  # buffers included
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, ranks[0]['state'][name]), name
            else:
                assert value == ranks[0]['state'][name], name
        assert r['num_calls'] == ranks[0]['num_calls'] == ref['num_calls']
    # ... and as the single process on the union of the data.
    got = ranks[0]
    assert got['grads'].keys() == ref['grads'].keys()
    for name, grad in ref['grads'].items():
        assert_close_to_scale(got['grads'][name], grad, name, rel)
    for name, value in ref['state'].items():
        if _is_param(name):
            assert_close_to_scale(got['state'][name], value, name, rel)
    for step, (mine, theirs) in enumerate(zip(got['logs'], ref['logs'])):
        for key, value in theirs.items():
            # float32 values (the wrapper logs torch.tensor(float), mmdet's
            # centerness loss is float32): rounding of a mean, ~1e-7.
            if not key.endswith('/time'):
                assert mine[key] == pytest.approx(
                    value, rel=1e-5, abs=1e-6), (step, key)
        assert 'dist/sync_mb' in mine
    if placement == 'split':
        # A parameter used by one rank only gets that rank's whole
        # gradient, not half of it (what averaging over 2 ranks gives).
        head = 'tasks.fmnist_seg.decode_head.conv_seg.weight'
        assert ref['grads'][head].abs().max() > 0
        assert_close_to_scale(got['grads'][head], ref['grads'][head], head,
                              rel)
        assert not torch.allclose(got['grads'][head], ref['grads'][head] / 2)
    if disjoint:
        conv = 'backbone.layer1.0.conv1.weight'
        for unit in (0, 1, 2, 3):
            assert f'{conv}.{unit}' in got['grads'], unit


def _rel(placement, world_size: int) -> float:
    """Tolerance of the float64 rank-vs-process comparison, relative to each
    tensor's largest value.

    1e-10 (float64 rounding of another summation order: <1e-12 measured)
    unless the detection batch is split over ranks: FCOS divides its box
    loss by ``avg_factor + float32 eps`` (mmdet's ``weight_reduce_loss``)
    with ``avg_factor`` its ranks' mean centerness sum, so 2 ranks add eps
    twice where one process adds it once and the box-loss gradients move by
    ``eps / (centerness sum)`` (1.1e-8 here; invisible in float32, where it
    is below the rounding). 1e-7 covers a sum down to ~1.2 and is still 100
    times tighter than the float32 check it replaces (1e-5).
    """
    ranks = ranks_of(plan_placement(placement, list(TASKS), world_size))
    return 1e-7 if len(ranks['mnist_det']) > 1 else 1e-10


def _is_param(name: str) -> bool:
    return not name.endswith(
        ('running_mean', 'running_var', 'num_batches_tracked', '_extra_state',
         'frozen_indices'))


def _global_batch() -> torch.Tensor:
    return torch.randn(
        6, 4, 5, 5, generator=torch.Generator().manual_seed(7)) * 3 + 1


def _norm_worker(rank, world_size, out_dir):
    torch.manual_seed(rank)
    bn = torch.nn.BatchNorm2d(4)
    lego = LegoBatchNorm(unit_width=2, num_legos=3)
    both = torch.nn.BatchNorm2d(4)  # each rank: its half of one batch
    sync = NormStatsSync(torch.nn.ModuleList([bn, lego, both]))
    both(_global_batch()[3 * rank:3 * rank + 3])
    x = torch.randn(3, 4, 5, 5) + rank
    if rank == 1:  # only rank 1 runs the stock norm
        bn(x)
    units = [0, 1] if rank == 0 else [1, 2]  # unit 1 on both ranks
    channels = torch.tensor([2 * u + i for u in units for i in range(2)])
    lego(x, units, channels)
    before = dict(bn=bn.running_mean.clone(), lego=lego.running_mean.clone())
    sync.sync()
    torch.save(
        dict(
            before=before,
            bn=bn.running_mean.clone(),
            lego=lego.running_mean.clone(),
            both=both.running_mean.clone(),
            tracked=int(bn.num_batches_tracked)),
        Path(out_dir) / f'norm{rank}.pt')


def test_norm_statistics_averaged_over_the_ranks_that_updated_them(tmp_path):
    run_ranks(
        _norm_worker,
        2,
        args=(str(tmp_path), ),
        timeout=120,
        err_dir=str(tmp_path / 'errors'))
    r0, r1 = (torch.load(tmp_path / f'norm{r}.pt') for r in range(2))
    for r in (r0, r1):
        # Stock norm: rank 1's update only (rank 0's is stale, not mixed in).
        assert torch.equal(r['bn'], r1['before']['bn'])
        assert r['tracked'] == 1
        # Lego units: 0 from rank 0, 2 from rank 1, 1 averaged.
        torch.testing.assert_close(r['lego'][:2], r0['before']['lego'][:2])
        torch.testing.assert_close(r['lego'][4:], r1['before']['lego'][4:])
        torch.testing.assert_close(
            r['lego'][2:4],
            (r0['before']['lego'][2:4] + r1['before']['lego'][2:4]) / 2)
    assert not torch.equal(r0['before']['bn'], r1['before']['bn'])
    # A batch split over both ranks: the averaged running mean is one
    # process's momentum update with the whole batch's mean.
    single = torch.nn.BatchNorm2d(4)
    single(_global_batch())
    for r in (r0, r1):
        torch.testing.assert_close(r['both'], single.running_mean)


def _group_worker(rank, world_size, out_dir):
    solo = [dist.new_group([r]) for r in range(world_size)]
    with default_group(solo[rank]):
        size = dist.get_world_size()
        value = torch.tensor([rank + 1.0])
        dist.all_reduce(value)  # only this rank takes part
    torch.save(
        dict(size=size, value=float(value), world=dist.get_world_size()),
        Path(out_dir) / f'group{rank}.pt')


def test_default_group_scopes_stock_collectives(tmp_path):
    """Inside ``default_group`` a head's all-reduce on the default group
    reaches the task's ranks only (here each rank alone): no hang, no mix."""
    run_ranks(
        _group_worker,
        2,
        args=(str(tmp_path), ),
        timeout=120,
        err_dir=str(tmp_path / 'errors'))
    for rank in range(2):
        out = torch.load(tmp_path / f'group{rank}.pt')
        assert out == dict(size=1, value=rank + 1.0, world=2)


def _crash_worker(rank, world_size, root, out_dir):
    model, optim = _build(False, False)
    wrapper = SIMTDistributedWrapper(model)
    wrapper.set_task_ranks(
        ranks_of(plan_placement('split', model.task_names, world_size)))
    if rank == 1:
        time.sleep(1)
        raise SystemExit(0)  # dies before its first iteration
    full = _batches(Path(root))
    data = OrderedDict((t, full[t]) for t in ('mnist_det', 'fmnist_cls'))
    start = time.perf_counter()
    try:
        wrapper.train_step(data, optim)
    except Exception as e:  # the collective fails instead of waiting
        (Path(out_dir) / 'raised.txt').write_text(
            f'{time.perf_counter() - start:.1f} {type(e).__name__}: {e}')
        return
    (Path(out_dir) / 'raised.txt').write_text('no error')


@pytest.mark.data
def test_a_dead_rank_raises_instead_of_hanging(demo_root, tmp_path):
    """A rank that dies mid-run makes the others' next collective raise
    (peer closed, or the process-group timeout) well within the timeout."""
    run_ranks(
        _crash_worker,
        2,
        args=(str(demo_root), str(tmp_path)),
        timeout=150,
        pg_timeout=20,
        err_dir=str(tmp_path / 'errors'))
    text = (tmp_path / 'raised.txt').read_text()
    assert text != 'no error', text
    assert float(text.split()[0]) < 60, text


# -------------------------------------------------------------- the runner
@HOOKS.register_module()
class _DistRecordHook(Hook):
    """Records each iteration's logged losses and this rank's image paths.
    """

    def __init__(self):
        self.losses, self.paths = {}, {}

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.losses[runner.iter] = {
            k: float(v)
            for k, v in outputs.items() if 'loss' in k
        }
        self.paths[runner.iter] = {
            task: [s.img_path for s in batch['data_samples']]
            for task, batch in data_batch.items()
        }


@HOOKS.register_module()
class _FixedTaskTimeHook(Hook):
    """Replaces each task's measured time in the step's outputs by a fixed
    cost before :class:`RuntimeInfoHook` logs it: re-planning then decides
    the same in every run, whatever the load of the machine."""

    priority = 'HIGHEST'

    def __init__(self, costs):
        self.costs = costs

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        for task, cost in self.costs.items():
            if f'{task}/time' in outputs:
                outputs[f'{task}/time'] = torch.tensor(float(cost))


def _full_part_resumed(root,
                       work_dir,
                       placement,
                       iters,
                       stop,
                       tag,
                       costs=None):
    """Runner runs on this rank: ``full`` (``iters`` iterations), ``part``
    (stops at ``stop`` with a checkpoint) and ``resumed`` (from it to
    ``iters``, validating at the end). ``costs``: fixed task times logged
    instead of the measured ones."""
    runs = {}
    hooks = [dict(type='_DistRecordHook')]
    if costs:
        hooks.append(dict(type='_FixedTaskTimeHook', costs=costs))
    for name, max_iters, ckpt in (('full', iters, 1000), ('part', stop, stop),
                                  ('resumed', iters, 1000)):
        wd = Path(work_dir) / ('full' if name == 'full' else 'part')
        cfg = runner_cfg(
            Path(root),
            wd,
            max_iters=max_iters,
            kind='lego',
            val=name == 'resumed',
            checkpoint_interval=ckpt,
            launcher='pytorch',
            model_wrapper_cfg=dict(type='SIMTDistributedWrapper'),
            custom_hooks=hooks,
            experiment_name=f'{tag}_{name}')
        cfg['train_cfg']['placement'] = placement
        if name == 'resumed':
            cfg.update(resume=True, load_from=str(wd / f'iter_{stop}.pth'))
        runner = Runner.from_cfg(Config(cfg))
        runner.train()
        hook = next(h for h in runner.hooks if isinstance(h, _DistRecordHook))
        runs[name] = dict(
            losses=hook.losses,
            paths=hook.paths,
            history=runner.train_loop.history,
            plan=runner.train_loop.plan,
            metrics={
                k: float(v.current())
                for k, v in runner.message_hub.log_scalars.items()
                if k.startswith('val/')
            })
    return runs


def _runner_worker(rank, world_size, root, work_dir, placement, out_dir):
    runs = _full_part_resumed(root, work_dir, placement, 4, 2, placement)
    torch.save(runs, Path(out_dir) / f'runner{rank}.pt')


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize('placement', ['all', 'split'])
def test_runner_trains_resumes_and_validates_on_two_ranks(
        demo_root, tmp_path, placement):
    """mmengine's Runner with the SIMT wrapper on 2 ranks: every rank logs
    every task; resuming at iteration 2 gives the losses of the
    uninterrupted run; validation evaluates every task over both ranks."""
    run_ranks(
        _runner_worker,
        2,
        args=(str(demo_root), str(tmp_path / 'work'), placement,
              str(tmp_path)),
        timeout=400,
        err_dir=str(tmp_path / 'errors'))
    runs = [torch.load(tmp_path / f'runner{r}.pt') for r in range(2)]
    full, resumed = runs[0]['full']['losses'], runs[0]['resumed']['losses']
    # Gathered logs: identical on both ranks.
    assert runs[1]['full']['losses'] == full
    assert sorted(resumed) == [2, 3]
    for task in TASKS:
        assert any(k.startswith(f'{task}/') for k in full[0]), task
    for it in (2, 3):
        for key, value in full[it].items():
            assert resumed[it][key] == pytest.approx(
                value, rel=1e-4, abs=1e-5), (it, key)
    metrics = runs[0]['resumed']['metrics']
    for task in TASKS:
        assert any(k.startswith(f'val/{task}/') for k in metrics), metrics


def _replan_worker(rank, world_size, root, work_dir, out_dir):
    # Equal costs (the default): det and cls on rank 0, seg on rank 1; the
    # logged times say det costs as much as the two others together.
    placement = dict(type='split', report_interval=2, min_gain=0.0)
    costs = dict(mnist_det=3.0, fmnist_seg=1.0, fmnist_cls=1.0)
    runs = _full_part_resumed(root, work_dir, placement, 6, 4, 'replan',
                              costs)
    torch.save(runs, Path(out_dir) / f'replan{rank}.pt')


@pytest.mark.slow
@pytest.mark.data
def test_replanning_moves_tasks_continues_their_data_and_resumes(
        tmp_path_factory, tmp_path):
    """Equal costs put det and cls on rank 0: the first report of the logged
    times (det 3, the others 1) re-plans (det alone; rank 0 only drops a
    task, rank 1 gains one) and later reports keep that plan; moved tasks
    continue their index streams (no sample drawn twice within the epoch);
    a run resumed at iteration 4 replays the plan history and logs the same
    losses."""
    root = make_demo_data(tmp_path_factory.mktemp('gppf_replan'), 24)
    run_ranks(
        _replan_worker,
        2,
        args=(str(root), str(tmp_path / 'work'), str(tmp_path)),
        timeout=400,
        err_dir=str(tmp_path / 'errors'))
    runs = [torch.load(tmp_path / f'replan{r}.pt') for r in range(2)]
    full = runs[0]['full']
    first = [['mnist_det', 'fmnist_cls'], ['fmnist_seg']]
    assert full['history'] == [
        (0, first), (2, [['mnist_det'], ['fmnist_cls', 'fmnist_seg']])
    ]
    assert runs[1]['full']['history'] == full['history']
    # Every task's samples over both ranks: no repeat within the epoch.
    for task in TASKS:
        drawn = [
            p for r in runs for it in sorted(r['full']['paths'])
            for p in r['full']['paths'][it].get(task, [])
        ]
        assert len(drawn) == 6 * 2 <= 24
        assert len(set(drawn)) == len(drawn), task
    # Resumed at 4: the same history, batches and losses as the full run.
    for r in runs:
        resumed = r['resumed']
        assert resumed['history'] == r['full']['history']
        assert resumed['plan'] == r['full']['plan']
        for it in (4, 5):
            assert resumed['paths'][it] == r['full']['paths'][it], it
            for key, value in r['full']['losses'][it].items():
                assert resumed['losses'][it][key] == pytest.approx(
                    value, rel=1e-4, abs=1e-5), (it, key)
