"""Per-task norm statistics: TaskBatchNorm2d, LegoBatchNorm rows, the
LegoResNet that selects them, their export, legacy loading and their
synchronisation over ranks."""
import logging
from pathlib import Path

import pytest
import torch
from _dist_common import run_ranks
from mmdet.models.backbones import ResNet as DenseResNet
from mmengine.logging import MMLogger

from projects.gppf import LegoResNet, extract_task_state_dict, use_task
from projects.gppf.models.lego.convert import load_dense_or_lego
from projects.gppf.models.lego.layers import LegoBatchNorm, route_channels
from projects.gppf.models.lego.packed_state import pack_state
from projects.gppf.models.lego.task_norm import TaskBatchNorm2d
from projects.gppf.utils.dist_sync import NormStatsSync

TASKS = ('det', 'seg', 'cls')


def _batches(seed=0):
    """Three tasks' batches of different statistics, float64."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, 5, 5, generator=g, dtype=torch.float64) *
             (t + 1) + 2 * t) for t in range(3)]


def _backbone(task_norm=None, tasks=TASKS, seed=0):
    torch.manual_seed(seed)
    model = LegoResNet(
        18, base_channels=8, tasks=tasks, task_norm=task_norm).double()
    model.init_weights()
    return model


@pytest.mark.parametrize('task_affine', [False, True])
def test_each_row_is_a_stock_norm_that_saw_only_its_task(task_affine):
    """Interleaved tasks: row ``t`` (and the output, train and eval) equals
    a stock BatchNorm2d fed task ``t``'s batches only."""
    norm = TaskBatchNorm2d(6, num_tasks=3, task_affine=task_affine).double()
    stock = [torch.nn.BatchNorm2d(6).double() for _ in range(3)]
    if task_affine:
        for t in range(3):
            with torch.no_grad():
                norm.task_weight[t].uniform_(0.5, 1.5)
                stock[t].weight.copy_(norm.task_weight[t])
    for step in range(2):
        for t in (2, 0, 1) if step else (0, 1, 2):
            x = _batches(step)[t]
            norm.task_index = t
            torch.testing.assert_close(norm(x), stock[t](x))
    norm.eval()
    for t in range(3):
        stock[t].eval()
        norm.task_index = t
        torch.testing.assert_close(norm.running_mean[t], stock[t].running_mean)
        torch.testing.assert_close(norm.running_var[t], stock[t].running_var)
        assert int(norm.num_batches_tracked[t]) == 2
        x = _batches(5)[0]
        torch.testing.assert_close(norm(x), stock[t](x))
    # The buffers are the full tables again after every forward.
    assert norm.running_mean.shape == (3, 6)
    assert (norm.weight is None) == task_affine


def test_lego_norm_rows_are_lego_norms_that_saw_only_their_task():
    norm = LegoBatchNorm(2, 3, num_tasks=2).double()
    alone = [LegoBatchNorm(2, 3).double() for _ in range(2)]
    routes = ([0, 1], [1, 2])
    for t, units in enumerate(routes):
        channels = route_channels(torch.tensor(units), 2)
        x = _batches()[t][:, :4]
        norm.task_index = t
        torch.testing.assert_close(
            norm(x, units, channels), alone[t](x, units, channels))
    for t in range(2):
        torch.testing.assert_close(norm.running_mean[t], alone[t].running_mean)
        torch.testing.assert_close(norm.running_var[t], alone[t].running_var)
        # Only the route's channels of the task's row moved.
        assert norm.running_mean[t].ne(0).sum() <= 4


def _eval_outputs(model, task, x):
    model.eval()
    with use_task(task), torch.no_grad():
        out = model(x)
    model.train()
    return out


@pytest.mark.parametrize('task_norm', ['stats', 'affine'])
def test_training_one_task_leaves_the_others_evaluation_alone(task_norm):
    """A training forward of ``seg`` (other statistics) leaves the
    evaluation of ``det`` unchanged; with one shared set it changes it."""
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for kind in (task_norm, 'shared'):
        model = _backbone(kind)
        with use_task('det'):
            model(x)
        before = _eval_outputs(model, 'det', x)
        with use_task('seg'):
            model(x * 4 + 3)
        after = _eval_outputs(model, 'det', x)
        same = all(torch.equal(a, b) for a, b in zip(before, after))
        assert same == (kind != 'shared'), kind


@pytest.mark.parametrize('task_norm', ['stats', 'affine'])
def test_export_carries_the_tasks_own_statistics(task_norm):
    """Each task's exported stock ResNet computes what the lego backbone
    computes for that task in evaluation (different statistics per task)."""
    model = _backbone(task_norm)
    if task_norm == 'affine':
        with torch.no_grad():
            for t in range(3):
                model.bn1.task_weight[t].mul_(t + 1)
    for t, task in enumerate(TASKS):
        with use_task(task):
            model(torch.randn(2, 3, 64, 64, dtype=torch.float64) * (t + 1))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    outs = {}
    for task in TASKS:
        dense = DenseResNet(18, base_channels=8).double()
        dense.load_state_dict(extract_task_state_dict(model, task))
        dense.eval()
        outs[task] = dense(x)
        for a, b in zip(_eval_outputs(model, task, x), outs[task]):
            torch.testing.assert_close(a, b)
    assert not torch.allclose(outs['det'][0], outs['seg'][0])


def test_affine_per_task_gets_gradients_of_its_task_only():
    model = _backbone('affine')
    with use_task('seg'):
        sum(o.sum()
            for o in model(torch.randn(2, 3, 32, 32).double())).backward()
    for name, param in model.named_parameters():
        if '.task_weight.' in name or '.task_bias.' in name:
            has = param.grad is not None
            assert has == name.endswith('.1'), name


def test_single_task_backbone_keeps_the_stock_layout():
    model = LegoResNet(18, base_channels=8)
    assert model.task_norm == 'shared' and not model.task_norm_modules
    state = model.state_dict()
    assert state['bn1.running_mean'].shape == (8, )
    assert state['layer1.0.bn1.running_mean'].shape == (16, )
    assert _backbone().task_norm == 'stats'
    with pytest.raises(ValueError, match='task_norm must be one of'):
        LegoResNet(18, tasks=TASKS, task_norm='per-task')


def test_checkpoint_with_one_set_of_statistics_loads_replicated():
    """A checkpoint of the layout before per-task norms (no ``task_norm``
    in its lego layout) loads into every task's row, with a message."""
    old = _backbone('shared')
    with use_task('cls'):
        old(torch.randn(2, 3, 32, 32).double())
    state = old.state_dict()
    layout = old.lego_layout()
    del layout['task_norm']
    state['_extra_state'] = pack_state(dict(lego_layout=layout))
    new = _backbone('stats', seed=1)
    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        new.load_state_dict(state)
    finally:
        logger.removeHandler(handler)
    assert any('replicated per task' in r.getMessage() for r in records)
    for t in range(3):
        torch.testing.assert_close(new.bn1.running_mean[t],
                                   old.bn1.running_mean)
        torch.testing.assert_close(new.layer2[0].bn1.running_var[t],
                                   old.layer2[0].bn1.running_var)
    # A checkpoint that does say its layout must match it.
    with pytest.raises(ValueError, match="task_norm='stats' vs 'shared'"):
        new.load_state_dict(old.state_dict())


def test_dense_checkpoint_inflates_into_every_tasks_norms():
    dense = DenseResNet(18, base_channels=8)
    with torch.no_grad():
        for p in dense.parameters():
            p.uniform_(0.5, 1.5)
        dense.bn1.running_mean.uniform_()
    state = dense.state_dict()
    model = LegoResNet(18, base_channels=8, tasks=TASKS, task_norm='affine')
    load_dense_or_lego(model, state)
    for t in range(3):
        torch.testing.assert_close(model.bn1.task_weight[t],
                                   state['bn1.weight'])
        torch.testing.assert_close(model.bn1.running_mean[t],
                                   state['bn1.running_mean'])
        torch.testing.assert_close(model.layer1[0].bn2.task_bias[t],
                                   state['layer1.0.bn2.bias'])


def _sync_worker(rank, world_size, out_dir):
    """Rank 0 runs task 0; rank 1 runs tasks 0 and 1 (lego units 1, 2)."""
    torch.manual_seed(rank)
    norm = TaskBatchNorm2d(4, num_tasks=3)
    lego = LegoBatchNorm(2, 3, num_tasks=3)
    sync = NormStatsSync(torch.nn.ModuleList([norm, lego]))
    for t in [0] if rank == 0 else [0, 1]:
        x = torch.randn(3, 4, 5, 5) + rank + t
        norm.task_index = lego.task_index = t
        norm(x)
        lego(x, [1, 2], route_channels(torch.tensor([1, 2]), 2))
    before = dict(
        norm=norm.running_mean.clone(), lego=lego.running_mean.clone())
    sync.sync()
    torch.save(
        dict(
            before=before,
            norm=norm.running_mean.clone(),
            lego=lego.running_mean.clone(),
            tracked=norm.num_batches_tracked.clone()),
        Path(out_dir) / f'task_norm{rank}.pt')


@pytest.mark.dist
def test_statistics_synchronise_per_task_over_the_ranks_that_ran_it(tmp_path):
    run_ranks(
        _sync_worker,
        2,
        args=(str(tmp_path), ),
        timeout=120,
        err_dir=str(tmp_path / 'errors'))
    r0, r1 = (torch.load(tmp_path / f'task_norm{r}.pt') for r in range(2))
    for name in ('norm', 'lego'):
        for r in (r0, r1):
            # Task 0 ran on both ranks: averaged; task 1 on rank 1 only:
            # its row, not mixed with rank 0's untouched one; task 2: none.
            torch.testing.assert_close(
                r[name][0],
                (r0['before'][name][0] + r1['before'][name][0]) / 2)
            assert torch.equal(r[name][1], r1['before'][name][1])
            assert torch.equal(r[name][2], r0['before'][name][2])
    assert r0['tracked'].tolist() == r1['tracked'].tolist() == [1, 1, 0]


def _pretrained(tmp_path, task_norm):
    """A 3-task backbone with distinct routes and statistics per task,
    saved as a whole-model checkpoint."""
    model = _backbone(task_norm)
    with torch.no_grad():
        model.router.logits.normal_(0, 1)
        if task_norm == 'affine':
            for t in range(3):
                model.bn1.task_weight[t].mul_(t + 2)
    for t, task in enumerate(TASKS):
        with use_task(task):
            model(torch.randn(2, 3, 64, 64, dtype=torch.float64) * (t + 1))
    path = tmp_path / f'{task_norm}.pth'
    torch.save(
        dict(state_dict={
            f'backbone.{k}': v
            for k, v in model.state_dict().items()
        }), path)
    return model, path


@pytest.mark.parametrize('task_norm', ['stats', 'affine'])
@pytest.mark.parametrize('tasks', [('trees', ), ('trees', 'seg')])
def test_a_new_task_starts_from_a_named_tasks_route_and_statistics(
        tmp_path, task_norm, tasks):
    """``init_cfg.task_map``: the new task computes, in evaluation, what
    its source task computed (route, gates, statistics, affine); the tasks
    kept by name keep theirs."""
    source, path = _pretrained(tmp_path, task_norm)
    model = LegoResNet(
        18,
        base_channels=8,
        tasks=tasks,
        task_norm=None if len(tasks) == 1 else task_norm,
        init_cfg=dict(
            type='Pretrained',
            checkpoint=str(path),
            prefix='backbone.',
            task_map=dict(trees='det'))).double()
    model.init_weights()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for task, origin in zip(tasks, ('det', 'seg')):
        assert torch.equal(
            model.router.greedy_indices(task),
            source.router.greedy_indices(origin))
        for a, b in zip(
                _eval_outputs(model, task, x),
                _eval_outputs(source, origin, x)):
            torch.testing.assert_close(a, b)


def test_a_task_mapped_to_nothing_names_the_fix(tmp_path):
    _, path = _pretrained(tmp_path, 'stats')
    init_cfg = dict(type='Pretrained', checkpoint=str(path))
    model = LegoResNet(
        18, base_channels=8, tasks=('trees', ), init_cfg=init_cfg)
    with pytest.raises(KeyError, match=r"task_map=dict\(trees="):
        model.init_weights()
    model = LegoResNet(
        18,
        base_channels=8,
        tasks=('trees', ),
        init_cfg=dict(init_cfg, task_map=dict(trees='sky')))
    with pytest.raises(KeyError, match="'sky', which the checkpoint"):
        model.init_weights()
    model = LegoResNet(
        18,
        base_channels=8,
        tasks=('trees', 'seg'),
        task_norm='shared',
        init_cfg=dict(init_cfg, task_map=dict(trees='det')))
    with pytest.raises(ValueError, match='cannot take them for its 2 tasks'):
        model.init_weights()


def test_task_sync_norm_survives_mmengines_single_process_revert():
    """mmengine reverts SyncBN to BN when not distributed; the per-task
    SyncBN keeps its rows and computes what TaskBN computes."""
    from mmengine.model import revert_sync_batchnorm
    model = LegoResNet(
        18, base_channels=8, tasks=TASKS, norm_cfg=dict(type='SyncBN'))
    model = revert_sync_batchnorm(model)
    assert type(model.bn1).__name__ == 'TaskSyncBatchNorm'
    reference = LegoResNet(18, base_channels=8, tasks=TASKS)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for task in TASKS:
        with use_task(task):
            for a, b in zip(model(x), reference(x)):
                torch.testing.assert_close(a, b)
    torch.testing.assert_close(model.bn1.running_mean,
                               reference.bn1.running_mean)
