"""Non-finite losses and gradients: the task is skipped, the others step.

Tiny GPPF models of ``_simt_common`` on real demo batches (CPU). A task is
poisoned by a NaN in its input image (so its forward also writes NaN into
the norms' running statistics) or by a term that adds 0 to its loss and an
infinite gradient to one of its parameters.
"""
import copy
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
from _dist_common import run_ranks
from _simt_common import (TASKS, dataloaders, make_demo_data, model_cfg,
                          runner_cfg)
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import MessageHub
from mmengine.registry import HOOKS, MODELS
from mmengine.runner import Runner

import projects.gppf  # noqa: F401  (registers GPPF)
import projects.gppf.engine  # noqa: F401
from projects.gppf.engine import SIMTAmpOptimWrapper, SIMTOptimWrapper
from projects.gppf.models import SIMTDistributedWrapper
from projects.gppf.models import nonfinite as nonfinite_module
from projects.gppf.models.nonfinite import INFO_KEY, NonFiniteGuard


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp('gppf_nonfinite'))


def _first_batches(root: Path) -> 'OrderedDict[str, dict]':
    """One real training batch (2 images) per task, in the model's order."""
    return OrderedDict(
        (task, next(iter(Runner.build_dataloader(cfg, seed=0))))
        for task, cfg in dataloaders(root, 'train', 2, False).items())


@pytest.fixture(scope='module')
def batches(demo_root):
    return _first_batches(demo_root)


@pytest.fixture
def hub():
    """A fresh message hub (the current instance) for the counts."""
    return MessageHub.get_instance(f'test_nonfinite_{uuid.uuid4().hex}')


def build(kind='lego', **nonfinite):
    torch.manual_seed(0)
    cfg = model_cfg(kind)
    if nonfinite:
        cfg['nonfinite'] = nonfinite
    model = MODELS.build(cfg)
    model.init_weights()
    return model.train()


def sgd(model):
    return SIMTOptimWrapper(
        torch.optim.SGD(
            model.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4))


@contextmanager
def poisoned(model, task, kind):
    """``kind='input'``: the task's first image is NaN after its stock
    preprocessor; ``'grad'``: its loss gets a 0-valued term whose gradient
    is +inf for the first parameter of the task's model; ``'stats'``: its
    forward leaves an infinite running variance in the backbone's stem norm
    (an overflow) with a finite loss."""
    if kind == 'input':
        target = model.data_preprocessor.preprocessors[task]
        original = target.forward

        def patched(*args, **kwargs):
            out = original(*args, **kwargs)
            out['inputs'][0] = float('nan')
            return out

        target.forward = patched
        name = 'forward'
    else:
        target = model.tasks[task]
        original = target.loss
        param = next(target.parameters())

        def patched(*args, **kwargs):
            losses = original(*args, **kwargs)
            if kind == 'grad':  # sqrt at 0: value 0, derivative +inf
                losses['loss_poison'] = torch.sqrt(param -
                                                   param.detach()).sum()
            else:  # through .data: autograd saved the tensor (unused)
                model.backbone.bn1.running_var.data[0] = float('inf')
            return losses

        target.loss = patched
        name = 'loss'
    try:
        yield
    finally:
        delattr(target, name)


def state(model, buffers=True):
    """Parameters and (``buffers``) norm statistics, cloned."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    if buffers:
        out.update({n: b.clone() for n, b in model.named_buffers()})
    return out


def changed(before, after, prefix):
    return {
        n
        for n in before
        if n.startswith(prefix) and not torch.equal(before[n], after[n])
    }


def without(batches, task):
    return OrderedDict((t, b) for t, b in batches.items() if t != task)


@pytest.mark.data
@pytest.mark.parametrize('task,kind', [('fmnist_seg', 'input'),
                                       ('fmnist_cls', 'grad'),
                                       ('mnist_det', 'stats')])
def test_skipped_task_changes_nothing(batches, hub, task, kind):
    """A NaN in the seg task's input (NaN loss, NaN norm statistics in the
    shared backbone), an infinite gradient of the cls task or an infinite
    running variance left by the det task's forward, with finite losses:
    that task updates nothing, and the model ends exactly as a
    reference that ran only the other tasks (parameters, momentum and norm
    statistics; the router's balance loss leaves the skipped task out)."""
    model = build()
    reference = copy.deepcopy(model)
    before = state(model)
    optim, ref_optim = sgd(model), sgd(reference)
    for _ in range(2):  # the second step also uses the momentum buffers
        with poisoned(model, task, kind):
            out = model.train_step(copy.deepcopy(batches), optim)
        ref_out = reference.train_step(
            copy.deepcopy(without(batches, task)), ref_optim)
        assert float(out[f'{task}/skipped']) == 1.0
        for other in TASKS:
            if other != task:
                assert float(out[f'{other}/skipped']) == 0.0
        assert float(out['router/skipped']) == 0.0
        # The logged total is that of the tasks that stepped.
        assert float(out['loss']) == pytest.approx(
            float(ref_out['loss']), rel=1e-6)
    after, expected = state(model), state(reference)
    assert after.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(after[name], value), name
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    # Exactly what changed: the skipped head nothing, the others and the
    # backbone (from the finite tasks' gradients) did.
    assert changed(before, after, f'tasks.{task}.') == set()
    for other in TASKS:
        if other != task:
            assert changed(before, after, f'tasks.{other}.'), other
    assert changed(before, after, 'backbone.')
    counts = hub.get_info(INFO_KEY)
    assert counts[task] == [2, 2]
    assert all(counts[t] == [0, 0] for t in TASKS if t != task)


@pytest.mark.data
def test_gradient_check_can_be_turned_off(batches, hub):
    """``check_grads=False``: only the loss is checked, so an infinite
    gradient with a finite loss reaches the optimizer."""
    model = build('resnet', check_grads=False)
    data = OrderedDict(fmnist_cls=copy.deepcopy(batches['fmnist_cls']))
    param = next(model.tasks['fmnist_cls'].parameters())
    with poisoned(model, 'fmnist_cls', 'grad'):
        out = model.train_step(data, sgd(model))
    assert float(out['fmnist_cls/skipped']) == 0.0
    assert not torch.isfinite(param).all()


@pytest.mark.data
def test_counts_warnings_reset_and_stop(batches, hub):
    """Every skip is a warning naming the task and the iteration; a finite
    iteration resets the count; ``max_consecutive`` skips in a row stop the
    run with an error naming the task, the iteration and the last
    checkpoint."""
    model = build('resnet', max_consecutive=3)
    optim = sgd(model)
    data = OrderedDict(fmnist_cls=batches['fmnist_cls'])
    logs = []

    def step(it, bad):
        hub.update_info('iter', it)  # as mmengine's RuntimeInfoHook does
        with mock.patch.object(nonfinite_module, 'print_log',
                               lambda msg, **kw: logs.append((msg, kw))):
            if not bad:
                return model.train_step(copy.deepcopy(data), optim)
            with poisoned(model, 'fmnist_cls', 'input'):
                return model.train_step(copy.deepcopy(data), optim)

    for it, bad in enumerate([True, True, False, True, True]):
        out = step(it, bad)
        assert float(out['fmnist_cls/skipped']) == float(bad)
    assert hub.get_info(INFO_KEY) == dict(fmnist_cls=[2, 4])
    assert len(logs) == 4
    msg, kw = logs[0]
    assert kw['level'] == 30  # logging.WARNING
    assert "'fmnist_cls' at iteration 1" in msg
    assert 'non-finite loss (fmnist_cls/loss=nan)' in msg
    assert '1 in a row of at most 3' in msg
    assert "'fmnist_cls' at iteration 5" in logs[-1][0]
    with pytest.raises(RuntimeError) as err:
        step(5, True)
    text = str(err.value)
    assert "'fmnist_cls'" in text and 'at iteration 6' in text
    assert '3 consecutive iterations' in text
    assert 'no checkpoint yet' in text
    assert logs[-1][0] == text and logs[-1][1]['level'] == 40  # ERROR
    # With a checkpoint, the error names it.
    hub.update_info('last_ckpt', '/work/iter_6.pth')
    with pytest.raises(RuntimeError, match=r'iteration 7.*/work/iter_6\.pth'):
        step(6, True)


def test_bad_arguments():
    with pytest.raises(ValueError, match='max_consecutive'):
        NonFiniteGuard(max_consecutive=0)
    with pytest.raises(KeyError, match='unknown GPPF nonfinite keys'):
        NonFiniteGuard.build(dict(check_grad=True))
    assert NonFiniteGuard.build(None).max_consecutive == 20
    assert NonFiniteGuard.build(dict(max_consecutive=None)).check_grads


# --------------------------------------------------------- mixed precision
def _cpu_amp_wrapper(model, **kwargs):
    """The SIMT twin of mmengine's AmpOptimWrapper on the CPU: mmengine
    asserts a GPU at construction and builds a CUDA GradScaler, which
    disables itself on a CPU; torch's CPU GradScaler (the same dynamic
    scaling) replaces it."""
    from mmengine.optim.optimizer import amp_optimizer_wrapper
    with mock.patch.object(amp_optimizer_wrapper, 'is_cuda_available',
                           lambda: True):
        wrapper = SIMTAmpOptimWrapper(
            optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            dtype='bfloat16',
            **kwargs)
    wrapper.loss_scaler = torch.amp.GradScaler('cpu', init_scale=2.**16)
    return wrapper


@pytest.mark.data
def test_amp_leaves_gradients_to_the_loss_scaler(batches, hub):
    """AmpOptimWrapper (bf16 autocast, dynamic loss scaling): a finite loss
    whose scaled gradient overflows is not skipped; the scaler skips the
    step and halves the scale, as without this module. A NaN loss is
    skipped and the other task steps at the same scale."""
    data = OrderedDict((t, batches[t]) for t in ('fmnist_seg', 'fmnist_cls'))
    model = build('resnet')
    optim = _cpu_amp_wrapper(model)
    before = state(model, buffers=False)
    # Finite loss (~2e34), gradients overflow at scale 2**16.
    model.loss_weights['fmnist_cls'] = 1e34
    out = model.train_step(copy.deepcopy(data), optim)
    assert float(out['fmnist_cls/skipped']) == 0.0
    assert torch.isfinite(out['loss'])
    assert optim.loss_scaler.get_scale() == 2.**15
    assert changed(before, state(model, buffers=False), '') == set()
    assert hub.get_info(INFO_KEY)['fmnist_cls'] == [0, 0]
    # A NaN loss: skipped by the guard; the scaler sees finite gradients.
    model.loss_weights['fmnist_cls'] = 1.0
    before = state(model, buffers=False)
    with poisoned(model, 'fmnist_cls', 'input'):
        out = model.train_step(copy.deepcopy(data), optim)
    assert float(out['fmnist_cls/skipped']) == 1.0
    assert optim.loss_scaler.get_scale() == 2.**15
    after = state(model, buffers=False)
    assert changed(before, after, 'tasks.fmnist_cls.') == set()
    assert changed(before, after, 'tasks.fmnist_seg.')
    assert hub.get_info(INFO_KEY)['fmnist_cls'] == [1, 1]


# ----------------------------------------------------------------- resume
@HOOKS.register_module()
class _PoisonClsHook(Hook):
    """Makes the cls task's input NaN in every training iteration."""

    def before_train(self, runner):
        self._ctx = poisoned(runner.model, 'fmnist_cls', 'input')
        self._ctx.__enter__()

    def after_train(self, runner):
        self._ctx.__exit__(None, None, None)


@pytest.mark.data
def test_count_survives_resume_and_error_names_checkpoint(demo_root, tmp_path):
    """2 skipped iterations, a checkpoint, a resumed run: its first
    iteration is the 3rd skip in a row (max_consecutive=3), so it stops
    there naming that checkpoint; the skip scalar is logged."""
    work = tmp_path / 'work'

    def run(max_iters, resume, name):
        cfg = runner_cfg(
            demo_root,
            work,
            max_iters=max_iters,
            val=False,
            checkpoint_interval=2,
            custom_hooks=[dict(type='_PoisonClsHook')],
            experiment_name=f'{name}_{uuid.uuid4().hex}')
        cfg['model']['nonfinite'] = dict(max_consecutive=3)
        if resume:
            cfg.update(resume=True, load_from=str(work / 'iter_2.pth'))
        runner = Runner.from_cfg(Config(cfg))
        return runner

    first = run(2, False, 'first')
    first.train()
    assert first.message_hub.get_info(INFO_KEY)['fmnist_cls'] == [2, 2]
    skipped = first.message_hub.log_scalars['train/fmnist_cls/skipped']
    assert list(skipped.data[0]) == [1.0, 1.0]
    assert list(
        first.message_hub.log_scalars['train/fmnist_seg/skipped'].data[0]) == [
            0.0, 0.0
        ]
    # Without the resumed count, the 3rd skip in a row would be at 5.
    resumed = run(6, True, 'resumed')
    with pytest.raises(RuntimeError) as err:
        resumed.train()
    text = str(err.value)
    assert "'fmnist_cls'" in text and 'at iteration 3' in text, text
    assert str(work / 'iter_2.pth') in text, text


# ------------------------------------------------------------ distributed
def _dist_worker(rank, world_size, root, placement, out_dir):
    from projects.gppf.engine.task_placement import plan_placement, ranks_of
    MessageHub.get_instance('test_nonfinite_dist')
    model = build()
    optim = sgd(model)
    wrapper = SIMTDistributedWrapper(model)
    task_ranks = ranks_of(
        plan_placement(placement, model.task_names, world_size))
    wrapper.set_task_ranks(task_ranks)
    full = _first_batches(Path(root))
    data = OrderedDict(
        (t, b) for t, b in full.items() if rank in task_ranks[t])
    # Iteration 0: a NaN input of seg on rank 1 only; iteration 1: an
    # infinite gradient of cls on rank 0 only; iteration 2: all finite.
    plan = [('fmnist_seg', 'input', 1), ('fmnist_cls', 'grad', 0), None]
    record = dict(tasks=list(data), states=[state(model)], logs=[])
    for step in plan:
        if step is not None and step[2] == rank and step[0] in data:
            with poisoned(model, step[0], step[1]):
                out = wrapper.train_step(copy.deepcopy(data), optim)
        else:
            out = wrapper.train_step(copy.deepcopy(data), optim)
        record['logs'].append({k: float(v) for k, v in out.items()})
        record['states'].append(state(model))
    record['counts'] = MessageHub.get_current_instance().get_info(INFO_KEY)
    torch.save(record, Path(out_dir) / f'rank{rank}.pt')


@pytest.mark.data
@pytest.mark.dist
@pytest.mark.parametrize('placement', ['all', 'split'])
def test_distributed_ranks_take_the_same_decision(demo_root, tmp_path,
                                                  placement):
    """2 gloo ranks; only one rank's batch of a task is bad (a NaN input,
    then an infinite gradient): every rank that runs the task skips it,
    every rank logs and counts the skip, and the replicas stay identical
    (parameters and norm statistics)."""
    run_ranks(
        _dist_worker,
        2,
        args=(str(demo_root), placement, str(tmp_path)),
        timeout=300,
        err_dir=str(tmp_path / 'errors'))
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    if placement == 'all':
        assert ranks[0]['tasks'] == ranks[1]['tasks'] == list(TASKS)
    else:  # seg alone on rank 1, det and cls on rank 0
        assert ranks[1]['tasks'] == ['fmnist_seg']
    expected = [dict(fmnist_seg=1.0), dict(fmnist_cls=1.0), {}]
    for it, bad in enumerate(expected):
        states = [r['states'][it + 1] for r in ranks]
        for name, value in states[0].items():
            assert torch.equal(value, states[1][name]), (it, name)
            assert torch.isfinite(value.float()).all(), (it, name)
        for r in ranks:
            for task in TASKS:
                assert r['logs'][it][f'{task}/skipped'] == bad.get(task,
                                                                   0.0), (it,
                                                                          task)
        before = ranks[0]['states'][it]
        for task in TASKS:
            moved = changed(before, states[0], f'tasks.{task}.')
            assert bool(moved) != (task in bad), (it, task)
    assert ranks[0]['counts'] == ranks[1]['counts'] == dict(
        mnist_det=[0, 0], fmnist_seg=[0, 1], fmnist_cls=[0, 1], router=[0, 0])
