"""RouteSearchHook: a search phase that trains only the routers inside the
backbone (and the head), then frozen routes and full fine-tuning."""
from types import SimpleNamespace

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample

import projects.gppf  # noqa: F401
from projects.gppf import RouteSearchHook, TaskRouterHook


def _classifier(frozen_stages: int = -1):
    torch.manual_seed(0)
    return MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(
                type='LegoResNet',
                depth=18,
                base_channels=8,
                tasks=('new', 'other'),
                task='new',
                out_indices=(3, ),
                frozen_stages=frozen_stages),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead',
                num_classes=3,
                in_channels=64,
                loss=dict(type='CrossEntropyLoss'))))


def _batch(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    labels = torch.randint(0, 3, (4, ), generator=gen)
    return dict(
        inputs=torch.randn(4, 3, 32, 32, generator=gen),
        data_samples=[DataSample().set_gt_label(int(y)) for y in labels])


def _train(model, hook, iters, start=0):
    """Run ``iters`` steps through the hook's calls; return the runner."""
    optim = build_optim_wrapper(
        model, dict(optimizer=dict(type='AdamW', lr=0.05, weight_decay=0.1)))
    runner = SimpleNamespace(model=model, iter=start, hooks=[hook])
    hook.before_train(runner)
    for it in range(start, start + iters):
        runner.iter = it
        hook.before_train_iter(runner, it)
        model.train_step(_batch(it), optim)
    return runner


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_search_trains_only_routers_then_freezes_and_releases():
    model = _classifier()
    router = model.backbone.router
    router.freeze()  # a copied route arrives frozen; the search frees it
    start_route = router.greedy_indices('new')
    before = _snapshot(model)
    hook = RouteSearchHook(search_iters=4, tasks=['new'], noise_std=(4., 0.))
    _train(model, hook, 4)
    after = _snapshot(model)
    # Inside the backbone only the router logits moved; weight decay did not
    # touch the frozen units (no gradient, no update); the head trained.
    backbone = {k for k in before if k.startswith('backbone.')}
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved & backbone == {'backbone.router.logits'}
    assert {'head.fc.weight', 'head.fc.bias'} <= moved
    # Only the searched task's logits got gradients (the other row only
    # decayed: AdamW, lr 0.05, weight decay 0.1, 4 steps).
    torch.testing.assert_close(
        after['backbone.router.logits'][1],
        before['backbone.router.logits'][1] * (1 - 0.05 * 0.1)**4)
    assert router.frozen == [False, True]
    assert router.noise_std == pytest.approx(1.0)  # 4 -> 0 over 4 steps
    # Iteration 4: the noise-free route freezes, the units train again.
    runner = SimpleNamespace(model=model, iter=4, hooks=[hook])
    hook.before_train_iter(runner, 4)
    assert router.frozen == [True, True]
    assert torch.equal(router.frozen_indices[0], router.greedy_indices('new'))
    assert all(p.requires_grad for p in model.parameters())
    assert start_route.shape == router.frozen_indices[0].shape
    frozen_route = router.frozen_indices[0].clone()
    optim = build_optim_wrapper(model,
                                dict(optimizer=dict(type='SGD', lr=0.1)))
    unit = 'backbone.conv1.weight'  # the shared stem
    weight = dict(model.named_parameters())[unit].detach().clone()
    model.train_step(_batch(9), optim)
    assert not torch.equal(weight, dict(model.named_parameters())[unit])
    assert torch.equal(router.frozen_indices[0], frozen_route)


def test_noise_explores_routes_during_the_search():
    # Noise far above the logits' scale draws other routes than the start
    # (seeded, so the draws are fixed); without noise the route holds.
    for noise, explores in ((4.0, True), (0.0, False)):
        model = _classifier()
        router = model.backbone.router
        start = router.greedy_indices('new').clone()
        hook = RouteSearchHook(search_iters=4, noise_std=(noise, noise))
        optim = build_optim_wrapper(model,
                                    dict(optimizer=dict(type='SGD', lr=1e-4)))
        runner = SimpleNamespace(model=model, iter=0, hooks=[hook])
        hook.before_train(runner)
        drawn = []
        for it in range(4):
            runner.iter = it
            hook.before_train_iter(runner, it)
            model.train_step(_batch(it), optim)
            drawn.append(router.routed[0].clone())
        assert any(not torch.equal(d, start) for d in drawn) == explores


def test_frozen_stages_stay_frozen_and_resume_after_search():
    model = _classifier(frozen_stages=1)
    stem = [
        p for n, p in model.named_parameters()
        if n.startswith('backbone.layer1.')
    ]
    assert stem and not any(p.requires_grad for p in stem)
    hook = RouteSearchHook(search_iters=2)
    _train(model, hook, 3)  # iteration 2 ends the search
    assert not any(p.requires_grad for p in stem)
    assert model.backbone.layer2[0].downsample[0].weight.requires_grad
    # A run resumed past the search keeps its routes and freezes nothing.
    model = _classifier()
    model.backbone.router.freeze()
    hook = RouteSearchHook(search_iters=2)
    _train(model, hook, 1, start=5)
    assert all(p.requires_grad for p in model.parameters())
    assert model.backbone.router.frozen == [True, True]


def test_reset_logits_starts_from_equal_logits():
    model = _classifier()
    hook = RouteSearchHook(search_iters=3, tasks=['new'], reset_logits=True)
    hook.before_train(SimpleNamespace(model=model, iter=0, hooks=[hook]))
    logits = model.backbone.router.logits.detach()
    assert torch.count_nonzero(logits[0]) == 0
    assert torch.count_nonzero(logits[1]) > 0


def test_bad_input_fails_before_training():
    with pytest.raises(ValueError, match='search_iters'):
        RouteSearchHook(search_iters=0)
    with pytest.raises(ValueError, match='noise_std'):
        RouteSearchHook(search_iters=2, noise_std=(1.0, ))
    model = _classifier()
    hook = RouteSearchHook(search_iters=2, tasks=['coco_det'])
    with pytest.raises(KeyError, match=r"\['coco_det'\].*'new', 'other'"):
        hook.before_train(SimpleNamespace(model=model, iter=0, hooks=[hook]))
    hook = RouteSearchHook(search_iters=2)
    runner = SimpleNamespace(
        model=model, iter=0, hooks=[hook, TaskRouterHook()])
    with pytest.raises(ValueError, match='keep one'):
        hook.before_train(runner)
    runner = SimpleNamespace(model=torch.nn.Linear(2, 2), iter=0, hooks=[])
    with pytest.raises(RuntimeError, match='no lego backbone'):
        hook.before_train(runner)
