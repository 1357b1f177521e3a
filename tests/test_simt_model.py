"""GPPF model: stock per-task pieces, one backbone, SIMT gradients, memory."""
import copy

import pytest
import torch
from _float64 import assert_close_to_scale, to_float64
from _simt_common import dataloaders, make_demo_data, model_cfg
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import Runner

import projects.gppf  # noqa: F401  (registers GPPF)
from projects.gppf.engine import SIMTAmpOptimWrapper, SIMTOptimWrapper
from projects.gppf.models import use_task

WEIGHTS = dict(mnist_det=0.5, fmnist_seg=2.0, fmnist_cls=1.0)


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp('gppf_demo'))


@pytest.fixture(scope='module')
def batches(demo_root):
    """One real training batch per task (batch size 2)."""
    out = {}
    for task, cfg in dataloaders(demo_root, 'train', 2, False).items():
        out[task] = next(iter(Runner.build_dataloader(cfg, seed=0)))
    return out


def build(kind='resnet', loss_weights=None):
    torch.manual_seed(0)
    model = MODELS.build(model_cfg(kind, loss_weights))
    model.init_weights()
    return model.train()


class _RecordingWrapper(SIMTOptimWrapper):
    """Keeps the gradients it would step with; never changes parameters."""

    def step(self, **kwargs):
        self.grads = {
            n: p.grad.clone()
            for n, p in self.named_params if p.grad is not None
        }
        self.steps = getattr(self, 'steps', 0) + 1


def recording_wrapper(model, **kwargs):
    wrapper = _RecordingWrapper(
        torch.optim.SGD(model.parameters(), lr=0.0), **kwargs)
    wrapper.named_params = list(model.named_parameters())
    return wrapper


@pytest.mark.data
def test_stock_classes_of_each_library(batches):
    """Preprocessors, heads and their nested losses come from their own
    library, even when the default scope is another library's."""
    DefaultScope.get_instance('test_stock_classes', scope_name='mmdet')
    cfg = model_cfg()
    # A prefixed type without `_scope_`: GPPF must build its sub-tree in
    # mmseg although the default scope is mmdet.
    seg = cfg['tasks']['fmnist_seg']
    seg.pop('_scope_')
    seg['type'] = 'mmseg.EncoderDecoder'
    model = MODELS.build(cfg)
    pre = model.data_preprocessor.preprocessors
    det, seg, cls = (model.tasks[t]
                     for t in ('mnist_det', 'fmnist_seg', 'fmnist_cls'))
    expect = {
        pre['mnist_det']: 'mmdet.models.data_preprocessors',
        pre['fmnist_seg']: 'mmseg.models.data_preprocessor',
        pre['fmnist_cls']: 'mmpretrain.models.utils.data_preprocessor',
        det: 'mmdet.models.detectors.fcos',
        det.bbox_head: 'mmdet.models.dense_heads.fcos_head',
        det.bbox_head.loss_centerness: 'mmdet.models.losses',
        det.bbox_head.loss_cls: 'mmdet.models.losses',
        seg: 'mmseg.models.segmentors',
        seg.decode_head: 'mmseg.models.decode_heads.fcn_head',
        seg.decode_head.loss_decode: 'mmseg.models.losses',
        cls: 'mmpretrain.models.classifiers',
        cls.head: 'mmpretrain.models.heads',
        cls.head.loss_module: 'mmpretrain.models.losses',
    }
    for module, where in expect.items():
        assert type(module).__module__.startswith(where), (module, where)
    assert type(pre['fmnist_seg']).__name__ == 'SegDataPreProcessor'
    assert type(cls.head.loss_module).__name__ == 'CrossEntropyLoss'
    assert model.task_scopes == dict(
        mnist_det='mmdet', fmnist_seg='mmseg', fmnist_cls='mmpretrain')
    # The stock preprocessors run through the multi-task one.
    for task, batch in batches.items():
        out = model.data_preprocessor(copy.deepcopy(batch), True, task=task)
        assert out['inputs'].shape[:2] == (2, 3)
        assert out['inputs'].dtype == torch.float32


def test_backbone_shared_once():
    model = build()
    state = model.state_dict()
    own = [k for k in state if 'backbone' in k and not k.startswith(
        'backbone.')]
    assert own == []
    assert any(k.startswith('tasks.mnist_det.bbox_head.') for k in state)
    for task in model.task_names:
        assert model.tasks[task].backbone is model.backbone
        assert (model.tasks[task].data_preprocessor is
                model.data_preprocessor.preprocessors[task])
    params = list(model.parameters())
    assert len(params) == len({id(p) for p in params})
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    n_tasks = sum(p.numel() for p in model.tasks.parameters())
    assert sum(p.numel() for p in params) == n_backbone + n_tasks
    # A round trip through the state dict restores every tensor.
    copy_model = build()
    copy_model.load_state_dict(state)


def test_init_weights_reaches_every_task_model():
    # The stock inits of the task heads run (FCOS: classification bias at
    # prior probability 0.01, convs normal with std 0.01; mmpretrain's
    # linear head: normal std 0.01); the shared backbone is initialised once.
    from mmengine.model import bias_init_with_prob
    model = build()
    head = model.tasks['mnist_det'].bbox_head
    torch.testing.assert_close(head.conv_cls.bias,
                               torch.full_like(head.conv_cls.bias,
                                               bias_init_with_prob(0.01)))
    assert head.conv_reg.weight.std() < 0.02
    assert model.tasks['fmnist_cls'].head.fc.weight.std() < 0.02
    # The demo's init_cfg=None keeps torch's default for mmseg's conv_seg
    # (uniform with bound 1/sqrt(fan_in), std 0.58 bound), not std 0.01.
    conv_seg = model.tasks['fmnist_seg'].decode_head.conv_seg.weight
    bound = conv_seg[0].numel()**-0.5
    assert conv_seg.abs().max() <= bound
    assert 0.45 * bound < conv_seg.std() < 0.7 * bound
    assert all(m.is_init for m in model.tasks.values())


def _separate_grads(model, batches, with_aux):
    """Each task's weighted loss backwarded alone; gradients summed."""
    total = {}
    for task, batch in batches.items():
        model.zero_grad(set_to_none=True)
        data = model.data_preprocessor(copy.deepcopy(batch), True, task=task)
        losses = model.loss(task, data['inputs'], data['data_samples'])
        loss = sum(v for k, v in losses.items() if 'loss' in k)
        (model.loss_weights[task] * loss).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                total[n] = total.get(n, 0) + p.grad.clone()
    if with_aux:
        model.zero_grad(set_to_none=True)
        model.aux_loss().backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                total[n] = total.get(n, 0) + p.grad.clone()
    return total


@pytest.mark.data
@pytest.mark.parametrize('kind', ['resnet', 'lego'])
def test_simt_gradients_equal_sum_of_tasks(batches, kind):
    model = build(kind, WEIGHTS)
    reference = copy.deepcopy(model)
    wrapper = recording_wrapper(model)
    log_vars = model.train_step(copy.deepcopy(batches), wrapper)
    assert wrapper.steps == 1 and wrapper.inner_count == 1
    expected = _separate_grads(reference, batches, with_aux=kind == 'lego')
    assert set(wrapper.grads) == set(expected)
    assert any(n.startswith('backbone.') for n in expected)
    for name, grad in expected.items():
        torch.testing.assert_close(
            wrapper.grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Logged: weighted total, per-task raw losses and times.
    task_total = 0.0
    for task, weight in WEIGHTS.items():
        assert f'{task}/time' in log_vars
        task_total += weight * sum(
            float(v) for k, v in log_vars.items()
            if k.startswith(f'{task}/') and 'loss' in k.split('/', 1)[1])
    if kind == 'lego':
        assert 'router/loss_aux' in log_vars
        task_total += float(log_vars['router/loss_aux'])
    assert float(log_vars['loss']) == pytest.approx(task_total, rel=1e-5)


@pytest.mark.data
def test_gradient_accumulation_counts_iterations(batches):
    """accumulative_counts=2: two SIMT iterations, one step, mean gradient.

    In float64: the accumulated gradient adds the tasks' halves in another
    order than the reference's sum, which float32 rounding would show."""
    model = to_float64(build())
    reference = copy.deepcopy(model)
    wrapper = recording_wrapper(model, accumulative_counts=2)
    wrapper.initialize_count_status(model, 0, 4)
    model.train_step(copy.deepcopy(batches), wrapper)
    assert not hasattr(wrapper, 'steps') and wrapper.inner_count == 1
    model.train_step(copy.deepcopy(batches), wrapper)
    assert wrapper.steps == 1 and wrapper.inner_count == 2
    # BN statistics differ between the two passes, gradients do not depend
    # on them in training mode: twice the same batch -> mean == one pass.
    expected = _separate_grads(reference, batches, with_aux=False)
    for name, grad in expected.items():
        assert_close_to_scale(wrapper.grads[name], grad, name)


@pytest.mark.data
def test_predict_and_forward_modes(batches):
    model = build().eval()
    for task, batch in batches.items():
        data = model.data_preprocessor(copy.deepcopy(batch), False, task=task)
        preds = model.predict(task, data['inputs'], data['data_samples'])
        assert len(preds) == 2
        with use_task(task):  # the context selects the task too
            assert len(model.val_step(copy.deepcopy(batch))) == 2
    with pytest.raises(RuntimeError, match='needs a task'):
        model.val_step(copy.deepcopy(batches['fmnist_cls']))
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        model.val_step(copy.deepcopy(batches['fmnist_cls']), task='nope')


@pytest.mark.data
def test_loss_keys_and_weights(batches):
    model = build(loss_weights=WEIGHTS)
    batch = model.data_preprocessor(
        copy.deepcopy(batches['fmnist_seg']), True, task='fmnist_seg')
    losses = model.loss('fmnist_seg', batch['inputs'], batch['data_samples'])
    assert set(losses) == {'fmnist_seg/decode.loss_ce',
                           'fmnist_seg/decode.acc_seg'}
    total, log_vars = model.parse_losses(losses)
    assert float(total) == pytest.approx(
        2.0 * float(losses['fmnist_seg/decode.loss_ce']))
    assert list(log_vars)[0] == 'loss'
    with pytest.raises(KeyError, match='not keyed <task>/<name>'):
        model.parse_losses({'loss_x': torch.tensor(1.0)})


@pytest.mark.data
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="mmengine's AmpOptimWrapper asserts a GPU")
def test_simt_amp_fp16_gradients(batches):
    """fp16 AMP: per-task scaled backward then one unscaled step."""
    model = build().cuda()
    reference = copy.deepcopy(model)
    wrapper = SIMTAmpOptimWrapper(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        loss_scale=1024.0)
    grads = {}

    def step(**kwargs):
        wrapper.loss_scaler.unscale_(wrapper.optimizer)
        grads.update({
            n: p.grad.clone()
            for n, p in model.named_parameters() if p.grad is not None
        })

    wrapper.step = step
    model.train_step(copy.deepcopy(batches), wrapper)
    with torch.autocast('cuda', dtype=torch.float16):
        expected = _separate_grads(reference, batches, with_aux=False)
    for name, grad in expected.items():
        torch.testing.assert_close(
            grads[name].float(), grad.float(), rtol=2e-2, atol=2e-3,
            msg=name)


def test_preprocessors_move_with_the_model():
    """``BaseModel.to`` sets the device of every stock preprocessor inside
    the multi-task one (no override of ours)."""
    model = build()
    pre = model.data_preprocessor
    assert 'to' not in type(pre).__dict__ and 'cuda' not in type(
        pre).__dict__
    assert {p.device.type for p in pre.preprocessors.values()} == {'cpu'}
    model.to('meta')
    assert pre.device == torch.device('meta')
    for task, stock in pre.preprocessors.items():
        assert stock.device == torch.device('meta'), task
        assert model.tasks[task].data_preprocessor is stock
    assert next(model.parameters()).device.type == 'meta'


def test_task_from_argument_context_or_the_only_one():
    """One rule everywhere (:func:`resolve_task`): the argument, else the
    :func:`use_task` context, else the only task."""
    from projects.gppf.models.task_context import resolve_task
    tasks = ['a', 'b']
    assert resolve_task('b', tasks, 'X') == 'b'
    with use_task('a'):
        assert resolve_task(None, tasks, 'X') == 'a'
        assert resolve_task('b', tasks, 'X') == 'b'
    assert resolve_task(None, ['only'], 'X') == 'only'
    with pytest.raises(RuntimeError, match='X needs a task'):
        resolve_task(None, tasks, 'X')
    with pytest.raises(KeyError, match="unknown task 'c'; X tasks"):
        resolve_task('c', tasks, 'X')
    model = build()
    with use_task('nope'), pytest.raises(KeyError, match="unknown task"):
        model.data_preprocessor({}, True)


def test_norms_say_which_statistics_they_updated():
    """The statistics a training forward updated, as the norms report them
    to :class:`NormStatsSync` (the distributed buffer job): a lego norm its
    route's channels (in the active task's row when kept per task), a
    per-task norm its task's row, a stock norm all; nothing in eval."""
    from projects.gppf.models.lego.layers import LegoBatchNorm
    from projects.gppf.models.lego.task_norm import TaskBatchNorm2d
    from projects.gppf.utils.dist_sync import NormStatsSync
    lego = LegoBatchNorm(unit_width=2, num_legos=3, num_tasks=2)
    task_bn = TaskBatchNorm2d(4, num_tasks=3)
    stock = torch.nn.BatchNorm2d(4)
    idle = torch.nn.BatchNorm2d(4).eval()
    sync = NormStatsSync(torch.nn.ModuleList([lego, task_bn, stock, idle]))
    assert sync.norms == [lego, task_bn, stock, idle]
    x = torch.randn(2, 4, 3, 3)
    lego.task_index = 1
    lego(x, [0, 2], torch.tensor([0, 1, 4, 5]))
    lego(x, [1, 2], channels=torch.tensor([2, 3, 4, 5]))  # keyword too
    task_bn.task_index = 2
    task_bn(x)
    stock(x)
    idle(x)
    expected = torch.zeros(2, 6)
    expected[1] = 1.0
    assert torch.equal(sync.masks[id(lego)], expected)
    expected = torch.zeros(3, 4)
    expected[2] = 1.0
    assert torch.equal(sync.masks[id(task_bn)], expected)
    assert sync.masks[id(stock)] is True
    assert sync.masks[id(idle)] is None
