from .guarded_dataset import GuardedDataset, truncated_image
from .resumable_batch_sampler import ResumableBatchSampler, SeededIndex

__all__ = [
    'GuardedDataset', 'truncated_image', 'ResumableBatchSampler', 'SeededIndex'
]
