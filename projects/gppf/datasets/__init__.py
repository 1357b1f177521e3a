from .guarded_dataset import GuardedDataset, truncated_image
from .resumable_batch_sampler import ResumableBatchSampler, SeededIndex
from .task_shard_sampler import TaskShardSampler

__all__ = [
    'GuardedDataset', 'truncated_image', 'ResumableBatchSampler',
    'SeededIndex', 'TaskShardSampler'
]
