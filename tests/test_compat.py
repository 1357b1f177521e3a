"""Pins every private torch, mmengine, mmpretrain and numpy name the project
relies on.

Each failure names the private name and the installed version; see
``projects/gppf/utils/compat.py`` for why each name is used.
"""
import inspect
import itertools
import math
import re
from types import SimpleNamespace

import mmengine
import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.dataset import DefaultSampler, InfiniteSampler
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.optim import OptimWrapper
from mmengine.runner.loops import IterBasedTrainLoop
from torch.utils.data import DataLoader

from projects.gppf.datasets import TaskShardSampler
from projects.gppf.utils import compat
from projects.gppf.utils.checkpoint import HISTORY_STATISTICS
from projects.gppf.utils.dist_sync import default_group


def _gone(name: str, package: str = 'torch') -> str:
    if package == 'mmpretrain':
        import mmpretrain
        version = mmpretrain.__version__
    else:
        version = dict(
            torch=torch.__version__,
            mmengine=mmengine.__version__,
            numpy=np.__version__)[package]
    pinned = compat.PINNED.get(package)
    return (f'{name} is gone or changed in {package} {version}'
            f'{f" (pinned on {pinned})" if pinned else ""}; see '
            'projects/gppf/utils/compat.py')


# --------------------------------------------------------------- torch
def test_default_pg_is_a_settable_property():
    from torch.distributed import distributed_c10d
    name = 'torch.distributed.distributed_c10d._world.default_pg'
    world = getattr(distributed_c10d, '_world', None)
    prop = getattr(type(world), 'default_pg', None)
    assert isinstance(prop, property) and prop.fset, _gone(name)
    assert compat.world_state() is world


def test_default_group_is_the_group_collectives_use():
    """Inside ``default_group`` torch's default group (what collectives
    without ``group=`` and ``GroupMember.WORLD`` read) is the given one; it
    is restored after the block, also after an error."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d
    name = 'distributed_c10d._world.default_pg as the default group'
    group = object()  # no process group needed to check the wiring
    before = distributed_c10d._world.default_pg
    with pytest.raises(KeyError):
        with default_group(group):
            assert dist.is_initialized(), _gone(name)
            assert distributed_c10d._get_default_group() is group, _gone(name)
            assert distributed_c10d.GroupMember.WORLD is group, _gone(name)
            raise KeyError
    assert distributed_c10d._world.default_pg is before
    with default_group(None):
        assert distributed_c10d._world.default_pg is before


def test_default_group_refuses_an_old_torch(monkeypatch):
    monkeypatch.setattr(torch, '__version__', '1.13.1')
    with pytest.raises(RuntimeError, match=r'torch >= 2.0, found torch 1.13'):
        with default_group(object()):
            pass


@pytest.mark.parametrize('name', [
    '_amp_foreach_non_finite_check_and_unscale_', '_foreach_norm',
    '_foreach_add_'
])
def test_fused_kernels_exist(name):
    assert callable(getattr(torch, name, None)), _gone(f'torch.{name}')


def _grads():
    return [
        torch.tensor([1.0, -2.0]),
        torch.tensor([[3.0], [float('nan')]]),
        torch.tensor([float('inf')]),
        torch.zeros(0)
    ]


@pytest.mark.parametrize('fused', [True, False])
def test_fused_kernels_and_their_fallbacks_agree(monkeypatch, fused):
    if not fused:
        for name in ('_AMP_CHECK', '_FOREACH_NORM', '_FOREACH_ADD_'):
            monkeypatch.setattr(compat, name, None)
    for tensors, bad in ((_grads()[:1], 0.0), (_grads(), 1.0)):
        found = torch.zeros(1)
        compat.non_finite_check_and_unscale_(tensors, found, torch.ones(1))
        assert found.item() == bad
    scaled = [torch.tensor([2.0, 4.0])]
    compat.non_finite_check_and_unscale_(scaled, torch.zeros(1),
                                         torch.full((1, ), 0.5))
    assert scaled[0].tolist() == [1.0, 2.0]
    norms = compat.foreach_norm(_grads()[:3], math.inf)  # no empty one
    assert norms[0].item() == 2.0
    assert not norms[1].isfinite() and not norms[2].isfinite()
    assert compat.foreach_norm([torch.tensor([3.0, 4.0])])[0].item() == 5.0
    olds = [torch.ones(2), torch.zeros(1)]
    compat.foreach_add_(olds, [torch.ones(2), torch.full((1, ), 3.0)])
    assert [t.tolist() for t in olds] == [[2.0, 2.0], [3.0]]


def test_sync_batchnorm_forward_needs_only_what_task_sync_bn_has():
    """``TaskSyncBatchNorm`` runs ``nn.SyncBatchNorm.forward`` on a
    ``BatchNorm2d``: the private methods that forward calls on ``self``
    are ``_check_input_dim`` (BatchNorm2d's) and the pinned check."""
    name = 'nn.SyncBatchNorm._check_non_zero_input_channels'
    assert compat.sync_bn_input_check is getattr(
        nn.SyncBatchNorm, '_check_non_zero_input_channels', None), _gone(name)
    with pytest.raises(ValueError, match='non-zero'):
        compat.sync_bn_input_check(None, torch.zeros(2, 0, 3, 3))
    compat.sync_bn_input_check(None, torch.zeros(2, 1, 3, 3))
    source = inspect.getsource(nn.SyncBatchNorm.forward)
    called = set(re.findall(r'self\.(_[a-z]\w*)\(', source))
    assert called <= {'_check_input_dim', '_check_non_zero_input_channels'
                      }, _gone(f'nn.SyncBatchNorm.forward calling {called}')


def test_batchnorm_base_class():
    name = 'torch.nn.modules.batchnorm._BatchNorm'
    from torch.nn.modules import batchnorm
    base = getattr(batchnorm, '_BatchNorm', None)
    assert base is not None and compat.BatchNormBase is base, _gone(name)
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                nn.SyncBatchNorm):
        assert issubclass(cls, base), _gone(f'{name} base of {cls.__name__}')


def test_load_from_state_dict_hook_signature():
    name = 'nn.Module._load_from_state_dict(state_dict, prefix, ...)'
    params = list(
        inspect.signature(nn.Module._load_from_state_dict).parameters)
    assert params == [
        'self', 'state_dict', 'prefix', 'local_metadata', 'strict',
        'missing_keys', 'unexpected_keys', 'error_msgs'
    ], _gone(name)

    class Recorder(nn.Linear):
        seen = []

        def _load_from_state_dict(self, state_dict, prefix, *args, **kw):
            self.seen.append(prefix)
            super()._load_from_state_dict(state_dict, prefix, *args, **kw)

    model = nn.Sequential(Recorder(1, 1))
    model.load_state_dict(model.state_dict())
    assert Recorder.seen == ['0.'], _gone(name)


def test_load_state_dict_pre_hook_with_bound_method():
    name = 'nn.Module._register_load_state_dict_pre_hook'
    seen = []

    class Hooked(nn.Linear):

        def __init__(self):
            super().__init__(1, 1)
            self._register_load_state_dict_pre_hook(self._pre_hook)

        def _pre_hook(self, state_dict, prefix, *args, **kwargs):
            seen.append((sorted(state_dict), prefix))

    model = nn.Sequential(Hooked())
    model.load_state_dict(model.state_dict())
    assert seen == [(['0.bias', '0.weight'], '0.')], _gone(name)


def test_vision_transformer_format_output():
    from mmpretrain.models import VisionTransformer
    name = 'mmpretrain VisionTransformer._format_output(self, x, hw)'
    method = getattr(VisionTransformer, '_format_output', None)
    assert callable(method), _gone(name, 'mmpretrain')
    assert list(inspect.signature(method).parameters) == ['self', 'x',
                                                          'hw'], _gone(
                                                              name,
                                                              'mmpretrain')
    vit = SimpleNamespace(out_type='cls_token')
    x = torch.arange(6.).view(1, 3, 2)  # cls token first
    assert method(vit, x,
                  (1, 2)).tolist() == [[0.0, 1.0]], _gone(name, 'mmpretrain')


def test_module_children_dict():
    name = 'nn.Module._modules'
    model = nn.Sequential(nn.Linear(1, 1))
    assert isinstance(getattr(model, '_modules', None), dict), _gone(name)
    child = model._modules['0']
    assert child is model[0], _gone(name)
    del model._modules['0']
    object.__setattr__(model, 'kept', child)  # a plain reference
    assert list(model.children()) == [] and model.kept is child, _gone(name)


# ------------------------------------------------------------ mmengine
def test_optim_wrapper_inner_count():
    name = 'OptimWrapper._inner_count'
    param = nn.Parameter(torch.ones(1))
    wrapper = OptimWrapper(
        torch.optim.SGD([param], lr=0.1), accumulative_counts=2)
    wrapper.initialize_count_status(nn.Linear(1, 1), 0, 4)
    assert getattr(wrapper, '_inner_count', None) == 0, _gone(name, 'mmengine')
    wrapper.update_params((param * 2).sum())  # 1 of 2: no step
    assert wrapper._inner_count == 1, _gone(name, 'mmengine')
    assert param.item() == 1.0
    wrapper._inner_count = 1  # what a subclass writes
    assert wrapper.should_update() is False, _gone(name, 'mmengine')
    wrapper._inner_count = 2
    assert wrapper.should_update() is True, _gone(name, 'mmengine')
    assert wrapper.inner_count == 2, _gone(name, 'mmengine')


def test_loop_protocol_fields():
    name = ('BaseLoop._runner, IterBasedTrainLoop._iter, _max_iters, '
            '_decide_current_val_interval')
    runner = SimpleNamespace(visualizer=SimpleNamespace())
    loop = IterBasedTrainLoop(
        runner,
        DataLoader([0, 1]),
        max_iters=3,
        val_interval=2,
        dynamic_intervals=[(2, 1)])
    assert getattr(loop, '_runner', None) is runner, _gone(name, 'mmengine')
    assert loop.runner is runner, _gone(name, 'mmengine')
    assert (loop._iter, loop._max_iters) == (0, 3), _gone(name, 'mmengine')
    loop._iter = 2
    assert (loop.iter, loop.max_iters) == (2, 3), _gone(name, 'mmengine')
    loop._decide_current_val_interval()
    assert loop.val_interval == 1, _gone(name, 'mmengine')


def test_history_buffer_statistics_are_class_methods():
    for name in HISTORY_STATISTICS:
        assert callable(getattr(HistoryBuffer, name,
                                None)), _gone(f'HistoryBuffer.{name}',
                                              'mmengine')


@pytest.mark.parametrize('shuffle', [True, False])
def test_task_shard_sampler_draws_the_stock_samplers_streams(shuffle):
    """A moved task continues the stream that ``InfiniteSampler`` drew on
    the ranks before; ``DefaultSampler`` epochs shard alike."""
    data = list(range(7))
    stock = list(
        itertools.islice(iter(InfiniteSampler(data, shuffle, seed=5)), 30))
    ours = list(
        itertools.islice(
            iter(TaskShardSampler(data, shuffle=shuffle, seed=5)), 30))
    assert ours == stock, _gone('InfiniteSampler index stream', 'mmengine')
    shard = TaskShardSampler(data, 1, 3, shuffle=shuffle, seed=5, offset=4)
    assert list(itertools.islice(iter(shard), 5)) == stock[5:20:3]
    assert len(shard) == len(data)
    for round_up in (True, False):
        for epoch in (0, 1):
            stock = DefaultSampler(data, shuffle, seed=5, round_up=round_up)
            stock.set_epoch(epoch)
            whole = list(stock)
            shards = []
            for rank in range(3):
                s = TaskShardSampler(
                    data,
                    rank,
                    3,
                    shuffle=shuffle,
                    seed=5,
                    infinite=False,
                    round_up=round_up)
                s.set_epoch(epoch)
                shards.append(list(s))
                assert len(s) == len(shards[-1])
            total = len(shards[0]) * 3 if round_up else len(data)
            padded = (whole * 2)[:total]
            assert [padded[r::3] for r in range(3)
                    ] == shards, _gone('DefaultSampler index order',
                                       'mmengine')


# --------------------------------------------------------------- numpy
def test_numpy_arrays_pickle_with_reconstruct():
    core = getattr(np, '_core', None) or np.core
    reconstruct = getattr(core.multiarray, '_reconstruct', None)
    assert reconstruct is not None and (np.zeros(1).__reduce__()[0]
                                        is reconstruct), _gone(
                                            'numpy core.multiarray.'
                                            '_reconstruct', 'numpy')
