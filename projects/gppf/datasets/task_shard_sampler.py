"""One shard of a dataset's index stream, for the ranks that run one task.

mmengine's ``InfiniteSampler`` and ``DefaultSampler`` shard a dataset over
every rank of the run. Under the ``split`` placement a task runs on some
of the ranks only, and a re-planned task continues on other ranks where
the previous ones stopped. :class:`TaskShardSampler` draws the same index
stream as those samplers, sharded over the ranks given to it and, when
endless, starting after the positions already drawn.
"""
import itertools
from typing import Iterator, Optional, Sized

import torch
from mmengine.dist import sync_random_seed
from mmengine.registry import DATA_SAMPLERS
from torch.utils.data import Sampler

__all__ = ['TaskShardSampler']


@DATA_SAMPLERS.register_module()
class TaskShardSampler(Sampler):
    """Shard ``rank`` of ``world_size`` of the stream of mmengine's samplers.

    With ``infinite=True``, ``InfiniteSampler``'s stream: one permutation
    of the dataset after the other from one generator seeded with ``seed``
    (``arange`` without shuffling); this shard reads positions
    ``offset + rank``, ``offset + rank + world_size``, ... With
    ``infinite=False``, one epoch of ``DefaultSampler``: a permutation
    seeded with ``seed + epoch``, repeated up to a multiple of
    ``world_size`` if ``round_up``; this shard reads every
    ``world_size``-th index from ``rank``.

    Args:
        dataset (Sized): The dataset.
        rank (int): This shard, ``0 <= rank < world_size``. Default: 0.
        world_size (int): Number of shards (ranks running the task).
            Default: 1.
        shuffle (bool): Permute the dataset. Default: True.
        seed (int, optional): Seed of the permutations; ``None`` takes a
            seed synchronised over the processes, as mmengine's samplers
            do. Default: None.
        infinite (bool): Endless stream (``InfiniteSampler``) or epochs
            (``DefaultSampler``). Default: True.
        round_up (bool): Epochs only: pad every shard to the same length.
            Default: True.
        offset (int): Endless stream only: positions of the stream already
            drawn (by the ranks that ran the task before). Default: 0.
    """

    def __init__(self,
                 dataset: Sized,
                 rank: int = 0,
                 world_size: int = 1,
                 shuffle: bool = True,
                 seed: Optional[int] = None,
                 infinite: bool = True,
                 round_up: bool = True,
                 offset: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f'TaskShardSampler: rank {rank} is not in '
                             f'[0, {world_size})')
        if offset < 0 or (offset and not infinite):
            raise ValueError(f'TaskShardSampler: offset {offset} needs '
                             'infinite=True and offset >= 0')
        self.dataset = dataset
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.infinite = shuffle, infinite
        self.seed = sync_random_seed() if seed is None else int(seed)
        self.round_up = round_up
        self.offset = int(offset)
        self.epoch = 0
        self.size = len(dataset)
        if round_up:
            self.num_samples = -(-self.size // self.world_size)
            self.total_size = self.num_samples * self.world_size
        else:
            self.num_samples = -(-(self.size - self.rank) // self.world_size)
            self.total_size = self.size
        # one stream per sampler, continued by every iter() (as mmengine's)
        self.indices = itertools.islice(self._stream(),
                                        self.offset + self.rank, None,
                                        self.world_size)

    def _permutation(self, generator: torch.Generator) -> list:
        if self.shuffle:
            return torch.randperm(self.size, generator=generator).tolist()
        return torch.arange(self.size).tolist()

    def _stream(self) -> Iterator[int]:
        """The endless index stream of all shards."""
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        while True:
            yield from self._permutation(generator)

    def __iter__(self) -> Iterator[int]:
        if self.infinite:
            yield from self.indices
            return
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        indices = self._permutation(generator)
        if self.round_up:
            indices = (indices *
                       (self.total_size // len(indices) + 1))[:self.total_size]
        yield from indices[self.rank:self.total_size:self.world_size]

    def __len__(self) -> int:
        """The dataset size (endless), or this shard's samples per epoch."""
        return self.size if self.infinite else self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next permutation (epochs only)."""
        self.epoch = epoch
