"""Batches that resume at the index level and samples seeded one by one."""
import pickle
import random

import numpy as np
import pytest
import torch
from mmengine.dataset import DefaultSampler, InfiniteSampler
from torch.utils.data import DataLoader, SequentialSampler

import projects.gppf  # noqa: F401  (registers the plugin)
from projects.gppf.datasets import (GuardedDataset, ResumableBatchSampler,
                                    SeededIndex)
from projects.gppf.utils.random_state import (get_random_state,
                                              isolated_random_state,
                                              sample_seed, set_random_state)


class _Items:
    """``len`` items whose loading draws from every random stream."""

    def __init__(self, n: int = 10) -> None:
        self.n = n
        self.metainfo = dict(classes=('x', ))

    def __len__(self) -> int:
        return self.n

    def get_data_info(self, idx: int) -> dict:
        # portrait and landscape items, for the aspect-ratio batch sampler
        return dict(width=10 + idx % 3, height=11, img_path=f'{idx}.png')

    def __getitem__(self, idx: int) -> dict:
        return dict(
            idx=int(idx),
            draws=torch.tensor(
                [random.random(),
                 np.random.rand(),
                 torch.rand(()).item()],
                dtype=torch.float64))


def _take(sampler, n):
    it = iter(sampler)
    return [[(int(i), i.seed) for i in next(it)] for _ in range(n)]


@pytest.mark.parametrize('kind', ['infinite', 'default', 'aspect_ratio'])
def test_skip_equals_drawing_and_dropping(kind):

    def make():
        data = _Items(10)
        if kind == 'infinite':
            sampler = InfiniteSampler(data, shuffle=True, seed=3)
        else:
            sampler = DefaultSampler(data, shuffle=True, seed=3)
        inner = dict(type='mmdet.AspectRatioBatchSampler') \
            if kind == 'aspect_ratio' else None
        return ResumableBatchSampler(
            sampler, 4, batch_sampler=inner, seed=7, stream='task')

    full = _take(make(), 14)  # several epochs of 10 items
    seeds = [s for batch in full for _, s in batch]
    assert len(set(seeds)) == len(seeds)  # one seed per sample
    resumed = make()
    resumed.skip(9)
    assert _take(resumed, 5) == full[9:]
    if kind == 'default':  # epochs (4 + 4 + 2) roll over, reshuffled
        epochs = [
            sorted(i for b in full[k:k + 3] for i, _ in b) for k in (0, 3)
        ]
        assert epochs[0] == epochs[1] == list(range(10))
        assert [i for b in full[:3] for i, _ in b] != \
            [i for b in full[3:6] for i, _ in b]


def test_seeded_index_survives_pickling_and_is_an_int():
    idx = SeededIndex(5, 123)
    back = pickle.loads(pickle.dumps(idx))
    assert back == 5 and back.seed == 123 and isinstance(back, int)
    assert [10, 11, 12, 13, 14, 15][idx] == 15


def _loader(num_workers):
    data = GuardedDataset(_Items(12), task='t')
    sampler = ResumableBatchSampler(
        InfiniteSampler(data, shuffle=True, seed=0), 3, seed=0, stream='t')
    return DataLoader(
        data,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=lambda b: b,
        generator=torch.Generator())  # as SIMTTrainLoop sets it


def _draws(loader, n):
    it = iter(loader)
    return [[(s['idx'], s['draws'].tolist()) for s in next(it)]
            for _ in range(n)]


def test_samples_draw_the_same_in_any_worker_and_leave_training_streams():
    torch.manual_seed(1)
    before = get_random_state()
    main = _draws(_loader(0), 6)
    after = get_random_state()
    # loading in the main process did not touch the training streams
    assert after['python'] == before['python']
    assert torch.equal(after['torch'], before['torch'])
    assert torch.equal(after['numpy'][1], before['numpy'][1])
    workers = _draws(_loader(2), 6)
    assert workers == main
    values = [tuple(d) for batch in main for _, d in batch]
    assert len(set(values)) == len(values)  # every sample its own draws


def test_random_state_round_trip_and_isolation(tmp_path):
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    state = get_random_state()
    path = tmp_path / 'state.pth'
    torch.save(state, path)
    want = (random.random(), np.random.rand(), torch.rand(()).item())
    set_random_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == want
    with isolated_random_state():
        random.random(), np.random.rand(), torch.rand(())
    set_random_state(state)
    set_random_state(get_random_state())
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == want


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, 'a', 0, 1, 2) == sample_seed(0, 'a', 0, 1, 2)
    seeds = {
        sample_seed(0, t, r, p, j)
        for t in 'ab'
        for r in range(2)
        for p in range(10)
        for j in range(4)
    }
    assert len(seeds) == 2 * 2 * 10 * 4
    assert all(0 <= s < 2**32 for s in seeds)


def test_resumable_batch_sampler_errors():
    sampler = ResumableBatchSampler(
        SequentialSampler(range(0)), 2, stream='empty_task')
    with pytest.raises(ValueError, match='empty_task.*no batch'):
        next(iter(sampler))
    with pytest.raises(ValueError, match='skip -1'):
        sampler.skip(-1)
