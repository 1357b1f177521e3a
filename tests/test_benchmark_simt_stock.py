"""``benchmark_simt.py --stock --synthetic``: random batches of given shapes
train every task, and each task's stock model is the dense twin of the lego
sub-network (the shapes a task's export loads into)."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from _simt_common import TASKS, model_cfg
from mmengine.config import Config
from mmengine.registry import MODELS

import projects.gppf  # noqa: F401
from projects.gppf.engine import SIMTOptimWrapper
from projects.gppf.models import lego
from tools.analysis_tools._synthetic_batches import (parse_shapes,
                                                     synthetic_batch)
from tools.analysis_tools.benchmark_simt import (benchmark, stock_task_models,
                                                 synthetic_batches)

SHAPES = ['mnist_det=2x64x64', 'fmnist_seg=2x64x64', 'fmnist_cls=4x28x28']
OPTIM = dict(
    type='SIMTOptimWrapper', optimizer=dict(type='SGD', lr=1e-3, momentum=0.9))


@pytest.fixture(scope='module')
def setup():
    cfg = Config(dict(model=model_cfg('lego', base=8), optim_wrapper=OPTIM))
    torch.manual_seed(0)
    model = MODELS.build(copy.deepcopy(cfg.model)).train()
    stock = stock_task_models(cfg, torch.device('cpu'), OPTIM)
    return cfg, model, stock


def test_stock_model_is_the_dense_twin_of_each_route(setup):
    _, model, stock = setup
    assert set(stock) == set(TASKS)
    for task, (net, _) in stock.items():
        assert type(net.backbone).__name__ == 'ResNet'
        assert list(net.tasks) == [task]
        dense = lego.extract_task_state_dict(model.backbone, task)
        twin = net.backbone.state_dict()
        assert set(twin) == set(dense), task
        assert all(twin[k].shape == dense[k].shape for k in dense), task
        heads = {k: v.shape for k, v in model.tasks[task].state_dict().items()}
        assert heads == {
            k: v.shape
            for k, v in net.tasks[task].state_dict().items()
        }


def test_synthetic_batches_train_every_task_and_stock_model(setup):
    _, model, stock = setup
    batches = synthetic_batches(model, SHAPES)
    assert list(batches) == list(TASKS)
    for task, spec in zip(TASKS, SHAPES):
        b, h, w = parse_shapes({task: spec.split('=')[1]})[task]
        assert len(batches[task]['inputs']) == len(
            batches[task]['data_samples']) == b
        assert all(img.shape == (3, h, w) and img.dtype == torch.uint8
                   for img in batches[task]['inputs'])
    wrapper = SIMTOptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-3))
    logs = model.train_step(copy.deepcopy(batches), wrapper)
    assert math.isfinite(float(logs['loss']))
    for task in TASKS:  # every task trained: a finite loss term, not skipped
        assert float(logs[f'{task}/skipped']) == 0, task
        assert any(
            k.startswith(f'{task}/') and 'loss' in k
            and math.isfinite(float(v)) for k, v in logs.items()), task
    res = benchmark(model, batches, wrapper, iters=1, warmup=0, stock=stock)
    assert set(res['stock_s']) == set(TASKS)
    assert res['stock_throughput_ratio'] == pytest.approx(res['sum_stock_s'] /
                                                          res['simt_s'])
    assert all(v > 0 for v in res['stock_peak'].values())


def test_bad_synthetic_specs_are_named(setup):
    _, model, _ = setup
    with pytest.raises(ValueError, match='fmnist_cls=4x28'):
        parse_shapes({'fmnist_cls': '4x28'})
    with pytest.raises(ValueError, match='BATCHxHEIGHTxWIDTH'):
        parse_shapes({'fmnist_cls': '0x28x28'})
    with pytest.raises(ValueError, match='each task of the config'):
        synthetic_batches(model, SHAPES[:2])
    with pytest.raises(TypeError, match='Linear'):
        synthetic_batch(nn.Linear(2, 2), (1, 8, 8))


def test_stock_needs_a_lego_resnet():
    cfg = Config(dict(model=model_cfg('lego_vit'), optim_wrapper=OPTIM))
    with pytest.raises(ValueError, match='LegoViT'):
        stock_task_models(cfg, torch.device('cpu'), OPTIM)
