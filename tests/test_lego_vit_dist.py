"""Distributed SIMT with a LegoViT backbone on 2 gloo processes (CPU).

As ``test_simt_distributed`` does for LegoResNet: GPPF with the tiny LegoViT
of :mod:`_simt_common` (``kind='lego_vit'``) and two tasks on synthetic
64x64 inputs (``fmnist_seg``: mmseg FCN head on the second ``featmap``;
``fmnist_cls``: mmpretrain global average pooling and linear head on the
last), float64 (:mod:`_float64`); 2 ranks must step like one process that
sees the union of their data.
"""
import copy
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from _dist_common import run_ranks
from _float64 import assert_close_to_scale, to_float64
from _simt_common import SIZE, model_cfg
from mmengine.registry import MODELS
from mmengine.structures import PixelData

import projects.gppf  # noqa: F401
from projects.gppf.engine import SIMTOptimWrapper
from projects.gppf.engine.task_placement import plan_placement, ranks_of
from projects.gppf.models import SIMTDistributedWrapper

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # ~65 s a case here

TASKS = ('fmnist_seg', 'fmnist_cls')
ITERS = 2
BATCH = 4


class _RecordingOptimWrapper(SIMTOptimWrapper):
    """Keeps the (synchronised, unclipped) gradients of its first step."""

    def step(self, **kwargs):
        if not hasattr(self, 'grads'):
            self.grads = {
                n: p.grad.clone()
                for n, p in self.named_params if p.grad is not None
            }
        super().step(**kwargs)


def _build(bn_eval: bool):
    """GPPF on the tiny LegoViT in float64; seg on units {2, 3}, cls on
    {0, 1} in every lego layer (each rank of 'split' owns units)."""
    torch.manual_seed(0)
    model = MODELS.build(model_cfg('lego_vit', tasks=TASKS))
    model.init_weights()
    to_float64(model)
    model.train()
    if bn_eval:  # the FCN head's BN: a batch split over ranks is exact
        for m in model.modules():
            if isinstance(getattr(m, 'running_mean', None), torch.Tensor):
                m.eval()
    router = model.backbone.router
    for task in TASKS:
        units = [2, 3] if task == 'fmnist_seg' else [0, 1]
        router.set_route(task, torch.tensor([units] * router.num_layers))
    optim = _RecordingOptimWrapper(
        torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4),
        clip_grad=dict(max_norm=1.0))
    optim.named_params = list(model.named_parameters())
    return model, optim


def _batches():
    """One synthetic batch of BATCH SIZE-pixel images per task."""
    from mmpretrain.structures import DataSample
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(0)

    def images():
        return [
            torch.randint(
                0, 256, (3, SIZE, SIZE), generator=gen, dtype=torch.uint8)
            for _ in range(BATCH)
        ]

    segs = []
    for _ in range(BATCH):
        sample = SegDataSample(
            metainfo=dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, 11, (1, SIZE, SIZE), generator=gen))
        segs.append(sample)
    labels = torch.randint(0, 10, (BATCH, ), generator=gen).tolist()
    return OrderedDict(
        fmnist_seg=dict(inputs=images(), data_samples=segs),
        fmnist_cls=dict(
            inputs=images(),
            data_samples=[DataSample().set_gt_label(i) for i in labels]))


def _shard(batch: dict, index: int, count: int) -> dict:
    n = len(batch['inputs']) // count
    return {k: v[index * n:(index + 1) * n] for k, v in batch.items()}


def _worker(rank, world_size, placement, out_dir):
    model, optim = _build(placement == 'all')
    wrapper = SIMTDistributedWrapper(model)
    task_ranks = ranks_of(plan_placement(placement, list(TASKS), world_size))
    wrapper.set_task_ranks(task_ranks)
    data = OrderedDict(
        (task,
         _shard(batch, task_ranks[task].index(rank), len(task_ranks[task])))
        for task, batch in _batches().items() if rank in task_ranks[task])
    logs = [{
        k: float(v)
        for k, v in wrapper.train_step(copy.deepcopy(data), optim).items()
    } for _ in range(ITERS)]
    torch.save(
        dict(
            tasks=list(data),
            grads=optim.grads,
            state=model.state_dict(),
            logs=logs),
        Path(out_dir) / f'rank{rank}.pt')


def _reference(bn_eval: bool):
    model, optim = _build(bn_eval)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same summation order
    try:
        logs = [{
            k: float(v)
            for k, v in model.train_step(copy.deepcopy(_batches()),
                                         optim).items()
        } for _ in range(ITERS)]
    finally:
        torch.set_num_threads(threads)
    return dict(grads=optim.grads, state=model.state_dict(), logs=logs)


@pytest.mark.parametrize('placement', ['all', 'split'])
def test_lego_vit_ranks_update_like_one_process(tmp_path, placement):
    """Both tasks on both ranks (batches split, head BN in eval mode) or one
    task per rank (disjoint lego units): the synchronised gradients (before
    clipping), the parameters after 2 SGD+momentum+weight decay+clipping
    steps and the logged losses equal one process's, to 1e-10 of each
    tensor's scale (float64: only the summation order differs)."""
    run_ranks(
        _worker,
        2,
        args=(placement, str(tmp_path)),
        timeout=240,
        err_dir=str(tmp_path / 'errors'))
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    ref = _reference(placement == 'all')
    if placement == 'all':
        assert ranks[0]['tasks'] == ranks[1]['tasks'] == list(TASKS)
    else:
        assert sorted(ranks[0]['tasks'] + ranks[1]['tasks']) == \
            sorted(TASKS)
        assert len(ranks[0]['tasks']) == len(ranks[1]['tasks']) == 1
    for name, grad in ranks[1]['grads'].items():
        assert torch.equal(grad, ranks[0]['grads'][name]), name
    for name, value in ranks[1]['state'].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, ranks[0]['state'][name]), name
    got = ranks[0]
    assert got['grads'].keys() == ref['grads'].keys()
    for name, grad in ref['grads'].items():
        assert_close_to_scale(got['grads'][name], grad, name)
    stats = ('running_mean', 'running_var')
    params = 0
    for name, value in ref['state'].items():
        if value.is_floating_point() and not name.endswith(stats):
            assert_close_to_scale(got['state'][name], value, name)
            params += 1
    assert params > 0
    for step, (mine, theirs) in enumerate(zip(got['logs'], ref['logs'])):
        for key, value in theirs.items():
            if not key.endswith('/time'):  # float32 logs: ~1e-7 rounding
                assert mine[key] == pytest.approx(
                    value, rel=1e-5, abs=1e-6), (step, key)
    # Every unit of a lego linear got its task's gradient (seg {2, 3},
    # cls {0, 1}); with 'split' from one rank only, not halved.
    qkv = 'backbone.layers.0.attn.qkv.weight.'
    for unit in range(4):
        assert ref['grads'][qkv + str(unit)].abs().max() > 0, unit
    if placement == 'split':
        head = 'tasks.fmnist_seg.decode_head.conv_seg.weight'
        assert not torch.allclose(got['grads'][head], ref['grads'][head] / 2)
