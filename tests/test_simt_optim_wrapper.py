"""The SIMT optimizer wrappers: several backward passes, one iteration.

Fast tier: tiny linear models and the three-task GPPF on drawn images
(:func:`make_synthetic_data`), CPU, float64 where sums are compared.
"""
import copy
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn as nn
from _float64 import assert_close_to_scale, to_float64
from _simt_common import (dataloaders, make_synthetic_data, model_cfg,
                          runner_cfg)
from mmengine.config import Config
from mmengine.optim import OptimWrapper, build_optim_wrapper
from mmengine.registry import MODELS
from mmengine.runner import Runner

import projects.gppf  # noqa: F401
from projects.gppf.engine import (SIMTAmpOptimWrapper, SIMTOptimWrapper,
                                  use_simt_optim_wrapper)

WEIGHTS = dict(mnist_det=0.5, fmnist_seg=2.0, fmnist_cls=1.0)


@pytest.fixture(scope='module')
def root(tmp_path_factory) -> Path:
    return make_synthetic_data(tmp_path_factory.mktemp('simt_optim'), 4, 2)


@pytest.fixture(scope='module')
def batches(root):
    """One drawn training batch (2 images) per task, in the model's order."""
    return {
        task: next(iter(Runner.build_dataloader(cfg, seed=0)))
        for task, cfg in dataloaders(root, 'train', 2, False).items()
    }


class _Recording(SIMTOptimWrapper):
    """Records each step's gradients (as the optimizer sees them) and the
    iterations it stepped at."""

    def step(self, **kwargs):
        self.grads = {
            n: p.grad.clone()
            for n, p in self.named_params if p.grad is not None
        }
        self.steps = getattr(self, 'steps', []) + [self.inner_count]
        super().step(**kwargs)


def _recording(model, **kwargs) -> _Recording:
    wrapper = _Recording(torch.optim.SGD(model.parameters(), lr=0.0), **kwargs)
    wrapper.named_params = list(model.named_parameters())
    return wrapper


def _gppf(kind='resnet', loss_weights=None):
    torch.manual_seed(0)
    model = MODELS.build(model_cfg(kind, loss_weights))
    model.init_weights()
    return model.train()


def _two_losses(model: nn.Module, x: torch.Tensor):
    """Two 'tasks' of a tiny model: two losses on two halves of a batch."""
    return [model(x[:2]).pow(2).mean(), model(x[2:]).sin().sum()]


# ------------------------------------------------------------- the counter
def test_backward_counts_nothing_end_iteration_counts_once():
    model = nn.Linear(3, 2)
    wrapper = SIMTOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    before = model.weight.detach().clone()
    for loss in _two_losses(model, torch.randn(4, 3)):
        wrapper.backward(wrapper.scale_loss(loss))
    assert wrapper.inner_count == 0
    assert model.weight.grad is not None
    assert torch.equal(model.weight, before)  # no step yet
    assert wrapper.end_iteration() is True
    assert wrapper.inner_count == 1
    assert not torch.equal(model.weight, before)
    assert model.weight.grad is None or not model.weight.grad.any()
    assert wrapper.last_sync == dict(params=0, bytes=0, time=0.0)


@pytest.mark.parametrize(
    'max_counts,stepped',
    [
        (4, [False, True, False, True]),
        (3, [False, True, True]),  # the last iteration updates alone
    ])
def test_accumulation_steps_and_scales_as_update_params(max_counts, stepped):
    """accumulative_counts=2: the SIMT wrapper (each loss backwarded
    separately) steps at the iterations ``update_params`` steps at and
    leaves the parameters where ``update_params`` of the summed loss
    leaves them, the last, unpaired iteration included (float64)."""
    torch.manual_seed(0)
    simt_model = nn.Linear(3, 2).double()
    stock_model = copy.deepcopy(simt_model)
    simt = SIMTOptimWrapper(
        torch.optim.SGD(simt_model.parameters(), lr=0.1, momentum=0.9),
        accumulative_counts=2)
    stock = OptimWrapper(
        torch.optim.SGD(stock_model.parameters(), lr=0.1, momentum=0.9),
        accumulative_counts=2)
    simt.initialize_count_status(simt_model, 0, max_counts)
    stock.initialize_count_status(stock_model, 0, max_counts)
    got = []
    for it in range(max_counts):
        x = torch.randn(4, 3, dtype=torch.float64)
        for loss in _two_losses(simt_model, x):
            simt.backward(simt.scale_loss(loss))
        got.append(simt.end_iteration())
        stock.update_params(sum(_two_losses(stock_model, x)))
        assert simt.inner_count == stock.inner_count == it + 1
        for p, q in zip(simt_model.parameters(), stock_model.parameters()):
            assert_close_to_scale(p.detach(), q.detach(), f'iter {it}')
    assert got == stepped


def test_update_params_is_one_iteration():
    """Stock callers (``update_params(loss)``) still count one iteration
    per call and step when due."""
    model = nn.Linear(3, 2)
    wrapper = SIMTOptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    before = model.weight.detach().clone()
    wrapper.update_params(model(torch.randn(4, 3)).sum())
    assert wrapper.inner_count == 1 and torch.equal(model.weight, before)
    wrapper.update_params(model(torch.randn(4, 3)).sum())
    assert wrapper.inner_count == 2
    assert not torch.equal(model.weight, before)


# ------------------------------------------------------- one SIMT iteration
def test_a_simt_iteration_of_three_tasks_counts_one(batches):
    """Three tasks and the router's loss: one iteration, one step."""
    model = _gppf('lego')
    wrapper = _recording(model)
    out = model.train_step(copy.deepcopy(batches), wrapper)
    assert wrapper.inner_count == 1 and wrapper.steps == [1]
    assert 'router/loss_aux' in out
    model.train_step(copy.deepcopy(batches), wrapper)
    assert wrapper.inner_count == 2 and wrapper.steps == [1, 2]


def test_simt_accumulation_steps_every_second_iteration(batches):
    """accumulative_counts=2 through GPPF.train_step: no step after the
    first iteration, one after the second, with the mean of the two
    iterations' gradients (the same batches twice: one iteration's)."""
    model = to_float64(_gppf(loss_weights=WEIGHTS))
    reference = copy.deepcopy(model)
    wrapper = _recording(model, accumulative_counts=2)
    wrapper.initialize_count_status(model, 0, 4)
    model.train_step(copy.deepcopy(batches), wrapper)
    assert wrapper.inner_count == 1 and not hasattr(wrapper, 'steps')
    model.train_step(copy.deepcopy(batches), wrapper)
    assert wrapper.inner_count == 2 and wrapper.steps == [2]
    once = _recording(reference)
    reference.train_step(copy.deepcopy(batches), once)
    assert wrapper.grads.keys() == once.grads.keys()
    for name, grad in once.grads.items():
        assert_close_to_scale(wrapper.grads[name], grad, name)


def test_simt_step_gradients_equal_weighted_sum_of_losses(batches):
    """One process, float64: the gradients the optimizer steps with are
    those of one backward of the weighted sum of every task's stock loss
    and the router's loss, all graphs alive at once."""
    model = to_float64(_gppf('lego', WEIGHTS))
    reference = copy.deepcopy(model)
    wrapper = _recording(model)
    log_vars = model.train_step(copy.deepcopy(batches), wrapper)
    total = 0
    for task, batch in batches.items():
        data = reference.data_preprocessor(
            copy.deepcopy(batch), True, task=task)
        losses = reference.loss(task, data['inputs'], data['data_samples'])
        total = total + WEIGHTS[task] * sum(
            v for k, v in losses.items() if 'loss' in k.split('/', 1)[1])
    total = total + reference.aux_loss()
    total.backward()
    expected = {
        n: p.grad
        for n, p in reference.named_parameters() if p.grad is not None
    }
    assert wrapper.grads.keys() == expected.keys()
    assert any(n.startswith('backbone.') for n in expected)
    for name, grad in expected.items():
        assert_close_to_scale(wrapper.grads[name], grad, name)
    assert float(log_vars['loss']) == pytest.approx(float(total), rel=1e-12)


def test_a_stock_optim_wrapper_is_refused_with_the_fix(batches):
    model = _gppf()
    stock = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="type='SIMTOptimWrapper'"):
        model.train_step(copy.deepcopy(batches), stock)
    assert stock.inner_count == 0


# --------------------------------------------------------- mixed precision
def _cpu_amp(model, **kwargs) -> SIMTAmpOptimWrapper:
    """SIMTAmpOptimWrapper on the CPU: mmengine's AmpOptimWrapper asserts a
    GPU at construction (patched here) and builds a CUDA GradScaler
    (replaced by torch's CPU one)."""
    from mmengine.optim.optimizer import amp_optimizer_wrapper
    with mock.patch.object(amp_optimizer_wrapper, 'is_cuda_available',
                           lambda: True):
        wrapper = SIMTAmpOptimWrapper(
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    wrapper.loss_scaler = torch.amp.GradScaler('cpu', init_scale=2.**10)
    return wrapper


def test_amp_scales_each_backward_and_unscales_once():
    """Each loss is multiplied by the scale before its backward; the step
    unscales the summed gradients once, before clipping: the update is
    the unscaled wrapper's (a power-of-2 scale is exact)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    plain_model = copy.deepcopy(model)
    amp = _cpu_amp(model, clip_grad=dict(max_norm=0.5))
    plain = SIMTOptimWrapper(
        torch.optim.SGD(plain_model.parameters(), lr=0.1),
        clip_grad=dict(max_norm=0.5))
    x = torch.randn(4, 3)
    losses = _two_losses(model, x)
    scaled = torch.autograd.grad(
        losses[0] * 2.**10, model.weight, retain_graph=True)[0]
    amp.backward(amp.scale_loss(losses[0]))
    assert torch.equal(model.weight.grad, scaled)
    amp.backward(amp.scale_loss(losses[1]))
    for loss in _two_losses(plain_model, x):
        plain.backward(plain.scale_loss(loss))
    assert amp.end_iteration() and plain.end_iteration()
    assert amp.inner_count == plain.inner_count == 1
    for p, q in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert amp.loss_scaler.get_scale() == 2.**10


def test_amp_type_from_a_config(batches):
    """``type='SIMTAmpOptimWrapper'`` builds and trains one SIMT iteration
    where mmengine allows its AmpOptimWrapper (a GPU)."""
    model = _gppf()
    cfg = dict(
        type='SIMTAmpOptimWrapper',
        optimizer=dict(type='SGD', lr=0.01),
        loss_scale='dynamic')
    try:
        wrapper = build_optim_wrapper(model, cfg)
    except AssertionError as e:
        pytest.skip("mmengine's AmpOptimWrapper refuses this machine "
                    f'(no GPU): {e}')
    model = model.cuda()
    wrapper = build_optim_wrapper(model, cfg)
    out = model.train_step(copy.deepcopy(batches), wrapper)
    assert isinstance(wrapper, SIMTAmpOptimWrapper)
    assert wrapper.inner_count == 1 and torch.isfinite(out['loss'])


# ------------------------------------------------ configs of stock wrappers
def _mapped(cfg):
    runner = SimpleNamespace(optim_wrapper=cfg)
    use_simt_optim_wrapper(runner)
    return runner.optim_wrapper


def test_stock_types_are_mapped_before_the_runner_builds_them():
    sgd = dict(type='SGD', lr=0.1)
    cfg = dict(type='OptimWrapper', optimizer=sgd, clip_grad=None)
    out = _mapped(cfg)
    assert out['type'] == 'SIMTOptimWrapper' and out['optimizer'] is sgd
    assert cfg['type'] == 'OptimWrapper'  # the caller's config unchanged
    assert _mapped(dict(optimizer=sgd))['type'] == 'SIMTOptimWrapper'
    assert _mapped(Config(
        dict(type='AmpOptimWrapper',
             optimizer=sgd)))['type'] == 'SIMTAmpOptimWrapper'
    assert _mapped(dict(type='mmengine.OptimWrapper',
                        optimizer=sgd))['type'] == 'SIMTOptimWrapper'
    assert _mapped(dict(type=OptimWrapper,
                        optimizer=sgd))['type'] == 'SIMTOptimWrapper'
    kept = dict(type='SIMTAmpOptimWrapper', optimizer=sgd)
    assert _mapped(kept) is kept
    built = SIMTOptimWrapper(
        torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))
    assert _mapped(built) is built
    assert _mapped(None) is None
    with pytest.raises(TypeError, match="type='SIMTOptimWrapper'"):
        _mapped(dict(type='ApexOptimWrapper', optimizer=sgd))
    with pytest.raises(TypeError, match="type='SIMTOptimWrapper'"):
        _mapped(
            OptimWrapper(
                torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)))
    with pytest.raises(TypeError, match='one optimizer wrapper'):
        _mapped(dict(a=dict(optimizer=sgd), b=dict(optimizer=sgd)))


def test_runner_with_a_stock_type_trains_with_the_simt_twin(root, tmp_path):
    """A config with ``type='OptimWrapper'`` and gradient accumulation:
    the runner builds the SIMT twin, counts one iteration per SIMT step
    and steps every second one."""
    cfg = runner_cfg(root, tmp_path, max_iters=2, val=False)
    cfg['optim_wrapper']['accumulative_counts'] = 2
    assert cfg['optim_wrapper']['type'] == 'OptimWrapper'
    runner = Runner.from_cfg(Config(cfg))
    runner.train()
    assert type(runner.optim_wrapper) is SIMTOptimWrapper
    assert runner.optim_wrapper.inner_count == 2
    assert 'train/grad_norm' in runner.message_hub.log_scalars
