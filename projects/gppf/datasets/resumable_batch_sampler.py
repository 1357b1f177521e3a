"""Endless batches that resume at the index level, one seed per sample.

:class:`ResumableBatchSampler` wraps the stock batch sampler of a training
dataloader (torch's ``BatchSampler`` or, e.g., mmdet's
``AspectRatioBatchSampler``) and

- never ends: at the end of an epoch it calls ``sampler.set_epoch`` with the
  next epoch and starts again (what mmengine's iteration-based loop does by
  restarting the dataloader, without restarting its workers);
- skips batches without loading them: :meth:`skip` drops the next ``n``
  batches of indices (a resumed run continues at iteration ``n`` without
  decoding a single image, and a stateful batch sampler such as the
  aspect-ratio one rebuilds its buckets exactly);
- tags every index with the seed of its sample (:class:`SeededIndex`), a
  function of the run's seed, the stream (task), the rank, the batch
  position and the slot in the batch; :class:`GuardedDataset` loads the
  sample inside that seed's random scope.
"""
from typing import Any, Iterator, List, Optional, Union

from mmengine.dist import get_dist_info
from mmengine.registry import DATA_SAMPLERS
from torch.utils.data import BatchSampler, Sampler

from ..utils.random_state import sample_seed

__all__ = ['ResumableBatchSampler', 'SeededIndex']


class SeededIndex(int):
    """A dataset index that carries the seed its sample is loaded with."""

    def __new__(cls, index: int, seed: int) -> 'SeededIndex':
        obj = super().__new__(cls, index)
        obj.seed = seed
        return obj

    def __reduce__(self):
        return SeededIndex, (int(self), self.seed)


@DATA_SAMPLERS.register_module()
class ResumableBatchSampler:
    """A stock batch sampler made endless, skippable and seeded.

    Built by ``runner.build_dataloader`` from
    ``batch_sampler=dict(type='ResumableBatchSampler', ...)``, which passes
    ``sampler`` and ``batch_size`` (:class:`SIMTTrainLoop` sets this up for
    every task's training dataloader).

    Args:
        sampler (Sampler): The dataset sampler (e.g. ``InfiniteSampler``).
        batch_size (int): Samples per batch.
        batch_sampler (dict, optional): The stock batch sampler config to
            wrap, built with the same ``sampler`` and ``batch_size``;
            ``None`` batches like torch's ``DataLoader`` does.
        drop_last (bool): For the default batch sampler. Default: False.
        seed (int): The run's seed. Default: 0.
        stream (str): Name of the stream (the task). Default: ''.
    """

    def __init__(self,
                 sampler: Sampler,
                 batch_size: int,
                 batch_sampler: Optional[Union[dict, Any]] = None,
                 drop_last: bool = False,
                 seed: Optional[int] = 0,
                 stream: str = '') -> None:
        if batch_sampler is None:
            batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        elif isinstance(batch_sampler, dict):
            batch_sampler = DATA_SAMPLERS.build(
                batch_sampler,
                default_args=dict(sampler=sampler, batch_size=batch_size))
        self.batch_sampler = batch_sampler
        self.sampler = sampler
        self.batch_size = batch_size
        self.seed = int(seed or 0)
        self.stream = stream
        self.rank = get_dist_info()[0]
        self.epoch = 0
        self.position = 0  # batch position of the next batch drawn
        self.pending = 0  # batches to drop before the next one yielded

    def skip(self, n: int) -> None:
        """Drop the next ``n`` batches (their indices are drawn, no sample
        is loaded)."""
        if n < 0:
            raise ValueError(f'cannot skip {n} batches')
        self.pending += int(n)

    def start_at(self, position: int) -> None:
        """Number the next batch ``position`` (a loader that takes over a
        stream mid-run keeps the seeds of its batches distinct)."""
        self.position = int(position)

    def __len__(self) -> int:
        """Batches per epoch of the wrapped batch sampler."""
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[List[SeededIndex]]:
        while True:
            empty = True
            for batch in self.batch_sampler:
                empty = False
                position = self.position
                self.position += 1
                if self.pending:
                    self.pending -= 1
                    continue
                yield [
                    SeededIndex(
                        i,
                        sample_seed(self.seed, self.stream, self.rank,
                                    position, j)) for j, i in enumerate(batch)
                ]
            if empty:
                raise ValueError(
                    f'{self.stream or "ResumableBatchSampler"}: the batch '
                    f'sampler {type(self.batch_sampler).__name__} gave no '
                    f'batch in epoch {self.epoch} (empty dataset shard?)')
            self.epoch += 1
            if hasattr(self.sampler, 'set_epoch'):
                self.sampler.set_epoch(self.epoch)
