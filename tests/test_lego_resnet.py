"""LegoResNet: shapes, sparse gradients, dense equivalence, routing, errors."""
import copy

import pytest
import torch
from _lego_common import check_export_tool, load_tool
from mmdet.models.backbones import ResNet as DenseResNet
from mmpretrain.models.backbones import ResNet as ClsResNet

from projects.gppf import (LegoResNet, extract_task_state_dict,
                           load_dense_or_lego, use_task)
from projects.gppf.models.lego.convert import lego_modules
from projects.gppf.models.lego.layers import gather_blocks


def _lego(depth=18, **kwargs):
    kwargs.setdefault('norm_eval', False)
    model = LegoResNet(depth, **kwargs)
    model.init_weights()
    return model


def _dense(depth, **kwargs):
    model = DenseResNet(depth, norm_eval=False, **kwargs)
    model.init_weights()
    # Non-trivial norms, so the comparison sees every affine and statistic.
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.uniform_(-0.2, 0.2, generator=gen)
            m.running_mean.uniform_(-0.1, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


@pytest.mark.parametrize('depth', [18, 50])
@pytest.mark.parametrize('out_indices', [(0, ), (1, ), (2, ), (3, ),
                                         (0, 1, 2, 3)])
def test_output_shapes(depth, out_indices):
    model = _lego(depth, out_indices=out_indices)
    outs = model(torch.randn(2, 3, 64, 64))
    expansion = 1 if depth == 18 else 4
    assert len(outs) == len(out_indices)
    assert model.out_channels == tuple(64 * 2**i * expansion
                                       for i in out_indices)
    for out, i, ch in zip(outs, out_indices, model.out_channels):
        assert out.shape == (2, ch, 64 // 2**(i + 2), 64 // 2**(i + 2))


@pytest.mark.parametrize('depth', [18, 50])
def test_gradients_reach_exactly_the_active_units(depth):
    model = _lego(
        depth,
        num_legos=4,
        num_active=2,
        tasks=('a', 'b'),
        zero_init_residual=False)
    model.router.set_route(
        'a', torch.tensor([[0, 2]] * 8 if depth == 18 else [[0, 2]] * 16))
    with use_task('a'):
        sum(o.float().pow(2).mean()
            for o in model(torch.randn(2, 3, 64, 64))).backward()
    checked = 0
    for name, module, _, _ in lego_modules(model):
        for key, param in module.named_parameters():
            idx = int(key.split('.')[-1])
            units = divmod(idx, 4) if key.startswith('weight') and getattr(
                module, 'lego_in', False) and getattr(module, 'lego_out',
                                                      False) else (idx, )
            if all(u in (0, 2) for u in units):
                assert param.grad is not None and \
                    param.grad.abs().sum() > 0, f'{name}.{key}: no grad'
            else:
                assert param.grad is None, f'{name}.{key}: inactive got grad'
            checked += 1
    assert checked > 0
    logit_grad = model.router.logits.grad
    assert (logit_grad[1] == 0).all(), 'the other task got router gradient'
    assert (logit_grad[0][:, [0, 2]] != 0).all()
    assert (logit_grad[0][:, [1, 3]] == 0).all()
    assert model.conv1.weight.grad.abs().sum() > 0  # shared stem trains


def test_running_stats_update_only_active_units():
    model = _lego(18, num_legos=4, num_active=2)
    model.router.set_route('default', torch.tensor([[1, 3]] * 8))
    bn = model.layer1[0].bn1
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    changed = (bn.running_mean != before).view(4, -1).all(dim=1)
    assert changed.tolist() == [False, True, False, True]


@pytest.mark.parametrize('k', [1, 2, 3])
def test_gather_blocks_equals_nested_cat(k):
    """The one-copy block gather of a both-sided conv gives the nested
    ``cat``'s tensor and the same gradient to every block (float64)."""
    gen = torch.Generator().manual_seed(0)
    blocks = [
        torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
        for _ in range(k * k)
    ]
    ours = [b.clone().requires_grad_(i != 1) for i, b in enumerate(blocks)]
    ref = [b.clone().requires_grad_(i != 1) for i, b in enumerate(blocks)]
    dense = gather_blocks(ours, k)
    expected = torch.cat(
        [torch.cat(ref[a * k:(a + 1) * k], 1) for a in range(k)], 0)
    assert dense.shape == (4 * k, 3 * k, 3, 3) and dense.is_contiguous()
    torch.testing.assert_close(dense, expected, rtol=0, atol=0)
    weight = torch.randn(dense.shape, generator=gen, dtype=torch.float64)
    (dense * weight).sum().backward()
    (expected * weight).sum().backward()
    for i, (a, b) in enumerate(zip(ours, ref)):
        if i == 1:
            assert a.grad is None and b.grad is None
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match='3 blocks do not make a 2 x 2'):
        gather_blocks([ours[0]] * 3, 2)


@pytest.mark.parametrize('depth', [18, 50])
@pytest.mark.parametrize('train', [True, False])
def test_single_unit_matches_dense(depth, train):
    dense = _dense(depth)
    lego = LegoResNet(depth, num_legos=1, num_active=1, norm_eval=False)
    load_dense_or_lego(lego, dense.state_dict())
    dense.train(train)
    lego.train(train)
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(dense(x), lego(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if train:
        torch.testing.assert_close(dense.layer1[0].bn1.running_mean,
                                   lego.layer1[0].bn1.running_mean)


@pytest.mark.parametrize('depth', [18, 50])
def test_inflated_checkpoint_matches_dense(depth, tmp_path):
    dense = _dense(depth)
    dense.eval()  # mmdet's ResNet.train() returns None
    path = tmp_path / 'dense.pth'
    torch.save({'state_dict': dense.state_dict()}, path)
    # N == k == 1: the lego network is the dense one.
    lego = LegoResNet(
        depth,
        num_legos=1,
        num_active=1,
        init_cfg=dict(type='Pretrained', checkpoint=str(path))).eval()
    lego.init_weights()
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(dense(x), lego(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # N=4, k=2: any route covering both dense slices reproduces it (the
    # hidden channels come out permuted, which the block output ignores).
    lego = LegoResNet(
        depth,
        num_legos=4,
        num_active=2,
        init_cfg=dict(type='Pretrained', checkpoint=str(path))).eval()
    lego.init_weights()
    lego.router.logits.data.zero_()  # equal gates of 1
    layers = sum(lego.stage_blocks)
    lego.router.set_route('default', torch.tensor([[2, 3]] * layers))
    for a, b in zip(dense(x), lego(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Route [1, 2] permutes the hidden channels: the convolutions sum them
    # in another order, so compare in float64 (measured ~4e-15; float32
    # gives ~2e-6, which CPUs' kernels vary).
    lego.router.set_route('default', torch.tensor([[1, 2]] * layers))
    dense.double()
    lego.double()
    x = x.double()
    for a, b in zip(dense(x), lego(x)):
        assert ((a - b).norm() / a.norm()).item() < 1e-12


@pytest.mark.parametrize('depth', [18, 50])
def test_extracted_task_is_a_stock_resnet(depth):
    lego = _lego(depth, tasks=('a', 'b'), zero_init_residual=False)
    with torch.no_grad():
        lego.router.logits.normal_()  # unequal gates, distinct routes
        for m in lego.modules():
            if hasattr(m, 'running_var'):
                m.running_var.uniform_(0.5, 1.5)
    lego.eval()
    dense = DenseResNet(depth)
    dense.eval()
    dense.load_state_dict(extract_task_state_dict(lego, 'b'), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with use_task('b'):
        lego_out = lego(x)
    for a, b in zip(dense(x), lego_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_switching_task_changes_route_and_output():
    model = _lego(18, tasks=('a', 'b'), zero_init_residual=False).eval()
    model.router.set_route('a', torch.tensor([[0, 1]] * 8))
    model.router.set_route('b', torch.tensor([[2, 3]] * 8))
    x = torch.randn(1, 3, 32, 32)
    with use_task('a'):
        out_a = model(x)[-1]
    with use_task('b'):
        out_b = model(x)[-1]
    assert not torch.allclose(out_a, out_b)
    assert model.router.greedy_indices('a').tolist() != \
        model.router.greedy_indices('b').tolist()


def test_frozen_route_does_not_change_under_training():
    model = _lego(18, tasks=('a', 'b'), router=dict(noise_std=5.0))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.router.freeze(['a'])
    frozen = model.router.greedy_indices('a')
    seen_b = set()
    for _ in range(5):
        for task in ('a', 'b'):
            with use_task(task):
                loss = sum(o.mean() for o in model(torch.randn(2, 3, 32, 32)))
            if task == 'b':
                seen_b.add(tuple(model.router.routed[1].flatten().tolist()))
            loss.backward()
        model.aux_loss().backward()
        opt.step()
        opt.zero_grad()
        assert torch.equal(model.router.greedy_indices('a'), frozen)
    # With this much noise the free task explores several routes.
    assert len(seen_b) > 1


def test_balance_loss_penalises_collapse():
    router = _lego(18, tasks=('a', 'b', 'c', 'd')).router
    router.train()
    with torch.no_grad():
        router.logits.zero_()
        router.logits[:, :, :2] = 3.0  # every task prefers units 0 and 1
    for task in router.tasks:
        router(task)
    collapsed = router.aux_loss().item()
    router.reset_usage()
    with torch.no_grad():
        router.logits.zero_()
        for t in range(4):  # tasks spread over all units
            router.logits[t, :, [(t * 2) % 4, (t * 2 + 1) % 4]] = 3.0
    for task in router.tasks:
        router(task)
    spread = router.aux_loss().item()
    assert collapsed > spread * 1.5
    assert spread == pytest.approx(router.balance_weight, rel=0.05)


def test_routes_survive_state_dict_round_trip():
    model = _lego(18, tasks=('a', 'b'), router=dict(noise_std=1.0))
    model.router.set_route('a', torch.tensor([[1, 3]] * 8))
    with use_task('b'):
        model(torch.randn(2, 3, 64, 64))
    state = copy.deepcopy(model.state_dict())
    other = _lego(18, tasks=('a', 'b'))
    other.load_state_dict(state)
    assert other.router.frozen == [True, False]
    assert other.router.num_calls == model.router.num_calls
    assert other.router.noise_std == 1.0
    assert torch.equal(
        other.router.greedy_indices('a'), model.router.greedy_indices('a'))
    torch.testing.assert_close(other.router.logits, model.router.logits)


def test_mismatched_lego_layout_is_refused():
    state = _lego(18, num_legos=4).state_dict()
    with pytest.raises(ValueError, match=r'num_legos=2 vs 4'):
        _lego(18, num_legos=2).load_state_dict(state, strict=False)
    state = _lego(18, tasks=('a', 'b')).state_dict()
    with pytest.raises(
            ValueError, match=r"tasks=\['a', 'c'\] vs \['a', 'b'\]"):
        _lego(18, tasks=('a', 'c')).load_state_dict(state, strict=False)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match='num_active=5, num_legos=4'):
        LegoResNet(18, num_legos=4, num_active=5)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        with use_task('nope'):
            _lego(18, tasks=('a', 'b'))(torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match='none is active'):
        _lego(18, tasks=('a', 'b'))(torch.randn(1, 3, 32, 32))
    with pytest.raises(KeyError, match="task='x' is not one of"):
        LegoResNet(18, tasks=('a', ), task='x')
    with pytest.raises(ValueError, match='does not support dcn'):
        LegoResNet(50, dcn=dict(type='DCNv2'))
    with pytest.raises(ValueError, match='per-unit BatchNorm'):
        LegoResNet(18, norm_cfg=dict(type='GN', num_groups=8))


def test_inflating_a_checkpoint_of_another_depth_names_the_tensor(tmp_path):
    path = tmp_path / 'r50.pth'
    torch.save({'state_dict': _dense(50).state_dict()}, path)
    lego = LegoResNet(
        18, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(
            ValueError,
            match=r'layer\d\.0\.\S+: expected shape \(.*\), got \('):
        lego.init_weights()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_cuda_amp_gradients_reach_exactly_the_active_units(dtype):
    model = _lego(50, tasks=('a', 'b'), zero_init_residual=False).cuda()
    model.router.set_route('a', torch.tensor([[0, 2]] * 16))
    x = torch.randn(4, 3, 64, 64, device='cuda')
    with use_task('a'), torch.autocast('cuda', dtype=dtype):
        outs = model(x)
    assert outs[-1].dtype == dtype
    sum(o.float().mean() for o in outs).backward()
    for name, module, _, _ in lego_modules(model):
        for key, param in module.named_parameters():
            idx = int(key.split('.')[-1])
            both = getattr(module, 'lego_in', False) and getattr(
                module, 'lego_out', False)
            units = divmod(idx, 4) if both else (idx, )
            active = all(u in (0, 2) for u in units)
            assert (param.grad is not None) == active, f'{name}.{key}'
            if active:
                assert torch.isfinite(param.grad).all()


def test_lego2resnet_tool_writes_a_stock_checkpoint(tmp_path):
    tool = load_tool('model_converters/lego2resnet.py')
    lego = _lego(18, tasks=('det', 'cls'), zero_init_residual=False)
    check_export_tool(
        tool, lego, tmp_path, 'cls_r18.pth', lambda meta, init_cfg: ClsResNet(
            18, out_indices=(0, 1, 2, 3), init_cfg=init_cfg),
        torch.randn(2, 3, 64, 64))
