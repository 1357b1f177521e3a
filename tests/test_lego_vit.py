"""LegoViT: stock equivalence, export, sparse gradients, routing, errors."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _float64 import assert_close_to_scale
from _lego_common import check_export_tool, load_tool
from mmengine.registry import MODELS
from mmpretrain.models.backbones import VisionTransformer

from projects.gppf import (LegoResNet, LegoViT, extract_vit_task_state_dict,
                           use_task)
from projects.gppf.engine import SIMTOptimWrapper
from projects.gppf.models.lego.linear_units import LegoLinear
from projects.gppf.models.lego.vit_convert import vit_lego_linears

ARCH = dict(embed_dims=32, num_layers=2, num_heads=4, feedforward_channels=64)
OUT_TYPES = ('cls_token', 'raw', 'featmap', 'avg_featmap')
KW = dict(img_size=32, patch_size=8)


def _stock(out_type='cls_token', **kwargs) -> VisionTransformer:
    """A float64 stock ViT with non-trivial weights everywhere."""
    torch.manual_seed(0)
    model = VisionTransformer(
        ARCH, out_type=out_type, out_indices=[0, -1], **KW, **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen) * 0.3 +
                (1.0 if p.dim() == 1 and p.shape[0] == 32 else 0.0))
    return model.double()


def _lego(tmp_path=None, stock=None, out_type='cls_token', **kwargs):
    """A float64 LegoViT, inflated from ``stock`` when given."""
    init_cfg = None
    if stock is not None:
        path = tmp_path / 'dense.pth'
        torch.save({'state_dict': stock.state_dict()}, path)
        init_cfg = dict(type='Pretrained', checkpoint=str(path))
    kwargs.setdefault('out_indices', (0, -1))
    model = LegoViT(
        ARCH, out_type=out_type, init_cfg=init_cfg, **KW, **kwargs).double()
    model.init_weights()
    return model


def _lego_grad(module, units, attr='weight'):
    """The route's gathered gradient of a lego linear (dense layout)."""
    grads = [getattr(module, attr)[i].grad for i in units]
    if module.lego_out:
        g, u = module.groups, module.out_features
        return torch.cat([x.view(g, u, -1) for x in grads],
                         1).view(g * u * len(units), -1).squeeze(-1)
    return torch.cat(grads, 1)


def _run(model, x, task=None):
    x = x.clone().requires_grad_(True)
    if task is None:
        outs = model(x)
    else:
        with use_task(task):
            outs = model(x)
    sum((o * torch.linspace(-1, 1, o.numel()).view_as(o).double()).sum()
        for o in outs).backward()
    return outs, x.grad


@pytest.mark.parametrize('out_type', OUT_TYPES)
@pytest.mark.parametrize('num_legos,route', [(2, [0, 1]), (4, [2, 3]),
                                             (4, [1, 2])])
def test_inflated_lego_equals_stock(tmp_path, out_type, num_legos, route):
    """Inflated, with equal gates (zero logits): a route covering both dense
    slices computes the stock ViT, outputs and gradients, in float64 (route
    [1, 2] permutes the head groups and hidden slices)."""
    stock = _stock(out_type)
    lego = _lego(tmp_path, stock, out_type, num_legos=num_legos)
    lego.router.logits.data.zero_()
    lego.router.set_route('default', torch.tensor([route] * 4))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want, want_dx = _run(stock, x)
    got, got_dx = _run(lego, x)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape
        assert_close_to_scale(a, b, f'{out_type} output {i}')
    assert_close_to_scale(got_dx, want_dx, 'input gradient')
    dense = dict(stock.named_parameters())
    seen = set()
    for name, param in lego.named_parameters():
        if name in dense:  # shared: patch embed, tokens, norms, biases
            assert_close_to_scale(param.grad, dense[name].grad, name)
            seen.add(name)
    for _, stock_name, module, layer in vit_lego_linears(lego):
        units = route
        if route == [1, 2]:  # unit 1 holds slice 1, unit 2 slice 0
            units = [2, 1]
        assert_close_to_scale(
            _lego_grad(module, units), dense[f'{stock_name}.weight'].grad,
            stock_name)
        seen.add(f'{stock_name}.weight')
        bias = _lego_grad(module, units, 'bias') if module.lego_out else \
            module.bias.grad
        assert_close_to_scale(bias, dense[f'{stock_name}.bias'].grad,
                              f'{stock_name}.bias')
        seen.add(f'{stock_name}.bias')
    assert seen == set(dense)


@pytest.mark.parametrize('out_type', OUT_TYPES)
def test_exported_task_is_a_stock_vit(out_type):
    """N=4, k=2, unequal gates: the export of a task loads strictly into a
    stock ViT that computes the task's lego outputs and gradients."""
    torch.manual_seed(0)
    lego = _lego(out_type=out_type, tasks=('a', 'b'))
    with torch.no_grad():
        lego.router.logits.normal_()
    assert lego.router.greedy_indices('a').tolist() != \
        lego.router.greedy_indices('b').tolist()
    stock = VisionTransformer(
        ARCH, out_type=out_type, out_indices=[0, -1], **KW).double()
    result = stock.load_state_dict(
        extract_vit_task_state_dict(lego, 'b'), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got, got_dx = _run(lego, x, 'b')
    want, want_dx = _run(stock, x)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close_to_scale(a, b, f'{out_type} output {i}')
    assert_close_to_scale(got_dx, want_dx, 'input gradient')
    dense = dict(stock.named_parameters())
    for name, param in lego.named_parameters():
        if name in dense:
            assert_close_to_scale(param.grad, dense[name].grad, name)


def test_gradients_reach_exactly_the_routed_units():
    lego = _lego(tasks=('a', 'b'))
    lego.router.set_route('a', torch.tensor([[0, 2], [1, 3], [0, 2], [1, 3]]))
    _run(lego, torch.randn(2, 3, 32, 32, dtype=torch.float64), 'a')
    route = lego.router.greedy_indices('a').tolist()
    checked = 0
    for name, _, module, layer in vit_lego_linears(lego):
        for key, param in module.named_parameters():
            parts = key.split('.')
            if len(parts) == 1:  # the shared bias of proj / fc2
                assert param.grad is not None, f'{name}.{key}'
                continue
            active = int(parts[1]) in route[layer]
            assert (param.grad is not None) == active, f'{name}.{key}'
            if active:
                assert param.grad.abs().sum() > 0, f'{name}.{key}'
            checked += 1
    assert checked == 2 * 6 * 4  # layers x unit tensors x units
    grad = lego.router.logits.grad
    assert (grad[1] == 0).all(), 'the other task got router gradient'
    for layer, units in enumerate(route):
        assert (grad[0, layer, units] != 0).all()
        off = [u for u in range(4) if u not in units]
        assert (grad[0, layer, off] == 0).all()
    for name in ('cls_token', 'pos_embed', 'patch_embed.projection.weight',
                 'layers.0.ln1.weight', 'ln1.bias'):
        assert lego.get_parameter(name).grad is not None, name


def test_frozen_stages():
    lego = _lego(frozen_stages=1, tasks=('a', ))
    lego.train()
    assert not lego.layers[0].training and lego.layers[1].training
    frozen = {n for n, p in lego.named_parameters() if not p.requires_grad}
    assert frozen == {
        n
        for n, _ in lego.named_parameters()
        if n.startswith(('layers.0.', 'patch_embed.', 'cls_token',
                         'pos_embed'))
    }
    _run(lego, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    grad = lego.router.logits.grad[0]
    assert (grad[:2] == 0).all(), 'frozen layers moved their gates'
    assert (grad[2:] != 0).any()


def test_pos_embed_interpolation(tmp_path):
    """Another input size, and a checkpoint of another image size."""
    stock = _stock('featmap')
    lego = _lego(tmp_path, stock, 'featmap', num_legos=2)
    lego.router.logits.data.zero_()
    x = torch.randn(1, 3, 48, 40, dtype=torch.float64)
    for a, b in zip(lego(x), stock(x)):
        assert a.shape == (1, 32, 6, 5)
        assert_close_to_scale(a, b, 'featmap at 48x40', rel=1e-6)
    big = LegoViT(
        ARCH,
        num_legos=2,
        img_size=48,
        patch_size=8,
        out_type='featmap',
        init_cfg=dict(
            type='Pretrained', checkpoint=str(tmp_path / 'dense.pth')))
    big.init_weights()
    assert big.pos_embed.shape == (1, 37, 32)


def test_timm_keys_inflate(tmp_path):
    stock = _stock()
    renames = {
        'patch_embed.projection.': 'patch_embed.proj.',
        'ffn.layers.0.0.': 'mlp.fc1.',
        'ffn.layers.1.': 'mlp.fc2.',
        'ln1.': 'norm1.',
        'ln2.': 'norm2.'
    }
    timm = {}
    for key, value in stock.state_dict().items():
        if key.startswith('layers.'):
            _, i, rest = key.split('.', 2)
            for a, b in renames.items():
                rest = rest.replace(a, b) if rest.startswith(a) else rest
            key = f'blocks.{i}.{rest}'
        elif key.startswith('ln1.'):
            key = 'norm.' + key[4:]
        else:
            key = key.replace('patch_embed.projection.', 'patch_embed.proj.')
        timm[key] = value
    timm['head.weight'] = torch.zeros(10, 32)
    path = tmp_path / 'timm.pth'
    torch.save({'model': timm}, path)
    lego = LegoViT(
        ARCH,
        num_legos=2,
        init_cfg=dict(type='Pretrained', checkpoint=str(path)),
        **KW).double()
    lego.init_weights()
    lego.router.logits.data.zero_()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_close_to_scale(lego(x)[0], stock(x)[-1], 'timm-inflated')


def test_mmseg_arguments():
    lego = LegoViT(
        img_size=(32, 32),
        patch_size=8,
        embed_dims=32,
        num_layers=4,
        num_heads=4,
        mlp_ratio=2,
        out_indices=(1, 3),
        act_cfg=dict(type='GELU'),
        norm_eval=False,
        with_cp=True,
        interpolate_mode='bicubic')
    assert lego.arch_settings['feedforward_channels'] == 64
    assert not lego.final_norm and lego.out_type == 'featmap'
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    outs = lego(x)
    assert [o.shape for o in outs] == [(2, 32, 4, 4)] * 2
    sum(o.sum() for o in outs).backward()  # through the checkpointed layers
    assert x.grad is not None
    with pytest.raises(ValueError, match='output_cls_token'):
        LegoViT(embed_dims=32, output_cls_token=True)


def test_bad_arguments_name_the_fix(tmp_path):
    with pytest.raises(
            ValueError,
            match='num_heads=3 must divide into '
            'num_active=2 .* choose num_active'):
        LegoViT('deit-tiny')
    with pytest.raises(
            ValueError,
            match='feedforward_channels=66 must '
            'divide into num_active=4'):
        LegoViT(
            dict(ARCH, feedforward_channels=66),
            num_legos=4,
            num_active=4,
            **KW)
    with pytest.raises(ValueError, match='num_active=5, num_legos=4'):
        LegoViT(ARCH, num_active=5, **KW)
    with pytest.raises(KeyError, match="unknown arch 'huge-ish'"):
        LegoViT('huge-ish')
    with pytest.raises(RuntimeError, match='none is active'):
        LegoViT(ARCH, tasks=('a', 'b'), **KW)(torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="unexpected arguments \\['depth'\\]"):
        LegoViT(ARCH, depth=50)
    state = LegoViT(ARCH, num_legos=4, **KW).state_dict()
    with pytest.raises(ValueError, match=r'num_legos=2 vs 4'):
        LegoViT(ARCH, num_legos=2, **KW).load_state_dict(state, strict=False)
    path = tmp_path / 'r18.pth'
    torch.save({'state_dict': LegoResNet(18).state_dict()}, path)
    lego = LegoViT(
        ARCH, init_cfg=dict(type='Pretrained', checkpoint=str(path)), **KW)
    with pytest.raises(ValueError, match=r"backbone='LegoViT' vs None"):
        lego.init_weights()
    wide = VisionTransformer(
        dict(ARCH, feedforward_channels=128), img_size=32, patch_size=8)
    path = tmp_path / 'wide.pth'
    torch.save({'state_dict': wide.state_dict()}, path)
    lego = LegoViT(
        ARCH, init_cfg=dict(type='Pretrained', checkpoint=str(path)), **KW)
    with pytest.raises(
            ValueError,
            match=r'layers\.0\.ffn\.layers\.0\.0: cannot '
            r'inflate a dense weight of shape \(128, 32\)'):
        lego.init_weights()


def test_state_dict_round_trip_keeps_routes():
    lego = _lego(tasks=('a', 'b'))
    lego.router.set_route('a', torch.tensor([[1, 3]] * 4))
    other = LegoViT(ARCH, tasks=('a', 'b'), **KW).double()
    other.load_state_dict(lego.state_dict())
    assert other.router.frozen == [True, False]
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with use_task('a'):
        assert_close_to_scale(other(x)[-1], lego(x)[-1], 'reloaded')


def test_layer_decay_optimizer_constructor():
    """mmpretrain's layer-wise lr decay reads LegoViT's names."""
    from mmpretrain.engine.optimizers import \
        LearningRateDecayOptimWrapperConstructor
    model = MODELS.build(
        dict(
            type='mmpretrain.ImageClassifier',
            backbone=dict(type='LegoViT', arch=ARCH, **KW),
            head=dict(
                type='mmpretrain.LinearClsHead',
                num_classes=10,
                in_channels=32)))
    constructor = LearningRateDecayOptimWrapperConstructor(
        dict(
            type='OptimWrapper',
            optimizer=dict(type='AdamW', lr=1.0, weight_decay=0.05)),
        paramwise_cfg=dict(layer_decay_rate=0.5))
    groups = constructor(model).optimizer.param_groups
    depth = {}
    for group in groups:
        name = group['param_name']
        if name.startswith('backbone.layers.'):
            want = int(name.split('.')[2]) + 1
        elif name.startswith(('backbone.cls_token', 'backbone.pos_embed',
                              'backbone.patch_embed')):
            want = 0
        else:  # final norm, router, head
            want = 3
        assert group['layer_id'] == want, name
        assert group['lr'] == pytest.approx(0.5**(3 - want)), name
        depth[name] = want
    assert 'backbone.layers.1.attn.qkv.weight.3' in depth
    assert 'backbone.router.logits' in depth
    assert len(depth) == len(list(model.parameters()))


def test_gppf_with_lego_vit_trains_one_step():
    from mmpretrain.structures import DataSample
    cls = dict(
        type='ImageClassifier',
        _scope_='mmpretrain',
        head=dict(
            type='LinearClsHead',
            num_classes=4,
            in_channels=32,
            loss=dict(type='CrossEntropyLoss')))
    model = MODELS.build(
        dict(
            type='GPPF',
            backbone=dict(type='LegoViT', arch=ARCH, **KW),
            tasks=dict(cls_a=cls, cls_b=cls),
            data_preprocessor=dict(
                type='MultiTaskDataPreprocessor',
                preprocessors={
                    t: dict(type='mmpretrain.ClsDataPreprocessor')
                    for t in ('cls_a', 'cls_b')
                })))
    model.init_weights()
    model.backbone.router.set_route('cls_a', torch.tensor([[0, 1]] * 4))
    model.backbone.router.set_route('cls_b', torch.tensor([[2, 3]] * 4))
    gen = torch.Generator().manual_seed(0)
    batches = {
        t:
        dict(
            inputs=[
                torch.randint(
                    0, 256, (3, 32, 32), generator=gen, dtype=torch.uint8)
                for _ in range(2)
            ],
            data_samples=[DataSample().set_gt_label(i) for i in (1, 3)])
        for t in ('cls_a', 'cls_b')
    }
    wrapper = SIMTOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log_vars = model.train_step(batches, wrapper)
    assert {'cls_a/loss', 'cls_b/loss'} <= set(log_vars)
    assert all(
        torch.isfinite(torch.as_tensor(v)).all() for v in log_vars.values())
    moved = {
        n
        for n, p in model.named_parameters() if not torch.equal(p, before[n])
    }
    qkv = 'backbone.layers.0.attn.qkv.weight.'
    assert {qkv + str(u) for u in range(4)} <= moved  # both tasks' units
    assert 'backbone.router.logits' in moved
    assert {'tasks.cls_a.head.fc.weight', 'tasks.cls_b.head.fc.weight'} <= \
        moved


def test_lego2vit_tool_writes_a_stock_checkpoint(tmp_path):
    tool = load_tool('model_converters/lego2vit.py')
    lego = LegoViT(
        ARCH,
        tasks=('det', 'cls'),
        out_type='featmap',
        out_indices=(0, 1),
        **KW)
    lego.init_weights()
    check_export_tool(
        tool, lego, tmp_path, 'cls_vit.pth',
        lambda meta, init_cfg: VisionTransformer(
            **dict(
                meta['stock_backbone'], out_type='featmap', out_indices=[0, 1]
            ),
            init_cfg=init_cfg), torch.randn(2, 3, 32, 32))


def test_mmpretrain_config_builds_a_lego_vit_classifier():
    from mmengine.config import Config
    root = Path(__file__).resolve().parents[1]
    cfg = Config.fromfile(
        str(root / 'configs' / 'lego_vit' /
            'vit-base-p16-lego_64xb64_in1k.py'))
    assert cfg.model.backbone.type == 'LegoViT'
    assert cfg.model.backbone.arch == 'b'
    cfg.model.backbone.update(arch=ARCH, **KW)
    cfg.model.head.update(in_channels=32, hidden_dim=64)
    model = MODELS.build(
        dict(
            cfg.model,
            type='mmpretrain.ImageClassifier',
            head=dict(
                cfg.model.head, type='mmpretrain.' + cfg.model.head.type)))
    assert isinstance(model.backbone, LegoViT)
    model.init_weights()
    assert model(torch.randn(2, 3, 32, 32), mode='tensor').shape == (2, 1000)


# ---------------------------------------------------- the routed linear
LINEARS = {  # name: (LegoLinear args, input width, gated)
    'qkv': ((6, 4, 4, 2, True, 3), 6, False),
    'fc1': ((6, 5, 4, 2, True), 6, False),
    'proj': ((3, 5, 4, 2, False), 6, True),
}


def _linear(name, bias=True):
    args, width, gated = LINEARS[name]
    torch.manual_seed(0)
    module = LegoLinear(*args, bias=bias).double()
    x = torch.randn(2, 3, width, dtype=torch.float64, requires_grad=True)
    gates = torch.tensor([0.7, 1.3], dtype=torch.float64,
                         requires_grad=True) if gated else None
    return module, x, gates


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('name', list(LINEARS))
def test_routed_linear_gradcheck(name, bias):
    """float64: the routed Function's gradients (input, units, gates)
    match finite differences and autograd through the gathered weight;
    unrouted units get none."""
    module, x, gates = _linear(name, bias)
    units = [3, 1]
    params = [module.weight[i] for i in units]
    if module.lego_out and bias:
        params += [module.bias[i] for i in units]
    elif bias:
        params.append(module.bias)
    inputs = [x] + ([gates] if gates is not None else []) + params

    def routed(x, *rest):
        g = rest[0] if gates is not None else None
        return module(x, units, g)

    assert torch.autograd.gradcheck(routed, inputs)
    want = F.linear(x, *module.gather(units, gates))
    got = module(x, units, gates)
    assert_close_to_scale(got, want, 'output')
    w = torch.randn_like(got)
    want_grads = torch.autograd.grad((want * w).sum(), inputs)
    got_grads = torch.autograd.grad((got * w).sum(), inputs)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_close_to_scale(a, b, f'gradient {i}')
    (module(x, units, gates) * w).sum().backward()
    for i in (0, 2):
        assert module.weight[i].grad is None
    if gates is not None:
        assert gates.grad is not None and (gates.grad != 0).all()


def _saved_bytes(fn, params) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in
    ``fn()``."""
    owned = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


@pytest.mark.parametrize('name', list(LINEARS))
def test_routed_linear_saves_what_a_dense_linear_saves(name):
    """A routed forward saves the input and references to the units, as a
    dense ``nn.Linear`` of the gathered shape: no weight-sized copy."""
    module, x, gates = _linear(name)
    units = [3, 1]
    weight, bias = module.gather(units, gates)
    dense = torch.nn.Linear(weight.shape[1], weight.shape[0]).double()
    got = _saved_bytes(lambda: module(x, units, gates),
                       list(module.parameters()))
    want = _saved_bytes(lambda: dense(x), list(dense.parameters()))
    assert want == x.numel() * x.element_size()
    assert got == want


def test_lego_vit_saves_what_the_stock_vit_saves():
    """The whole backbone: a route saves no more than the stock ViT (the
    gates aside: a few bytes per layer)."""
    stock = _stock()
    lego = _lego(num_legos=4)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = _saved_bytes(lambda: stock(x), list(stock.parameters()))
    got = _saved_bytes(lambda: lego(x), list(lego.parameters()))
    assert got <= want + 1024, (got, want)


def test_routed_linear_under_autocast():
    """bf16 autocast on the CPU: the routed linear computes in bf16 like
    autocast's ``F.linear``; the units' gradients are float32."""
    module, x, gates = _linear('proj')
    module.float()
    x = x.detach().float().requires_grad_(True)
    gates = gates.detach().float().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = module(x, [3, 1], gates)
        want = F.linear(x, *module.gather([3, 1], gates))
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    got.float().sum().backward()
    assert module.weight[3].grad.dtype == torch.float32
    assert gates.grad is not None and module.weight[0].grad is None
