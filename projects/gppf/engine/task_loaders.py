"""Per-task dataloaders and evaluators of the SIMT loops.

The runner and its hooks read one ``loop.dataloader``
(``dataloader.dataset.metainfo`` for checkpoints and visualisers,
``len(dataloader)`` for logs and schedulers, ``dataloader.sampler.set_epoch``
for seeding). :class:`TaskLoaders` is that one object for a dict of stock
dataloaders keyed by task; iterating it yields one batch per task.
"""
import copy
from collections import OrderedDict
from typing import (Any, Callable, Dict, Iterator, List, Mapping, Optional,
                    Union)

from mmengine.evaluator import Evaluator
from mmengine.model import is_model_wrapper
from torch.utils.data import DataLoader

from ..datasets import GuardedDataset, ResumableBatchSampler
from ..models.task_config import check_task_name, scope_of, with_scope

__all__ = [
    'TaskLoaders', 'build_task_loaders', 'build_task_evaluators',
    'model_tasks', 'task_keys', 'shard_loader_cfg', 'train_loader_cfg'
]


class _TaskDatasets:
    """``loaders.dataset``: the tasks' datasets, ``metainfo`` per task."""

    def __init__(self, datasets: Mapping[str, Any]) -> None:
        self.datasets = OrderedDict(datasets)

    @property
    def metainfo(self) -> Dict[str, Optional[dict]]:
        return OrderedDict((task, getattr(ds, 'metainfo', None))
                           for task, ds in self.datasets.items())

    def __getitem__(self, task: str) -> Any:
        return self.datasets[task]

    def __len__(self) -> int:
        return sum(len(ds) for ds in self.datasets.values())


class _TaskSamplers:
    """``loaders.sampler``: ``set_epoch`` reaches every task's sampler."""

    def __init__(self, loaders: Mapping[str, DataLoader]) -> None:
        self.loaders = loaders

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders.values():
            _set_epoch(loader, epoch)


class _TaskBatches:
    """Endless iterator of ``{task: batch}``, one batch of every task.

    Each task's loader is iterated endlessly (a :class:`ResumableBatchSampler`
    never ends; another loader is restarted at the end of an epoch, with
    ``set_epoch`` on its sampler, as mmengine does). Loader iterators are
    created on first use, so that building a loop starts no worker, and
    follow ``owner.loaders``: a task whose loader object was replaced (a new
    placement) gets a new iterator, a task that left is dropped.
    ``owner.before_batch(n)``, if set, runs before the ``n``-th batch
    (0-based) is drawn or skipped.
    """

    def __init__(self, owner: 'TaskLoaders') -> None:
        self.owner = owner
        self.iterators: Dict[str, Iterator] = OrderedDict()
        self.count = 0

    def __iter__(self) -> '_TaskBatches':
        return self

    def skip(self, n: int) -> None:
        """Skip ``n`` batches of every task without loading them where the
        loader has a :class:`ResumableBatchSampler` (only its indices are
        drawn); other loaders load and drop them."""
        for _ in range(n):
            if self.owner.before_batch is not None:
                self.owner.before_batch(self.count)
            self.count += 1
            for task, loader in self.owner.loaders.items():
                it = self.iterators.get(task)
                sampler = loader.batch_sampler
                if isinstance(sampler, ResumableBatchSampler) and (
                        it is None or it.loader is not loader):
                    sampler.skip(1)
                else:
                    next(self._iterator(task, loader))

    def __next__(self) -> Dict[str, Any]:
        if self.owner.before_batch is not None:
            self.owner.before_batch(self.count)
        self.count += 1
        loaders = self.owner.loaders
        for gone in [t for t in self.iterators if t not in loaders]:
            del self.iterators[gone]  # a task that moved to other ranks
        return OrderedDict((task, next(self._iterator(task, loader)))
                           for task, loader in loaders.items())

    def _iterator(self, task: str, loader: DataLoader) -> '_Endless':
        it = self.iterators.get(task)
        if it is None or it.loader is not loader:
            it = self.iterators[task] = _Endless(loader)
        return it


class _Endless:
    """Iterates a dataloader endlessly, epoch after epoch."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.epoch = 0
        self.iterator = iter(loader)

    def __iter__(self) -> '_Endless':
        return self

    def __next__(self) -> Any:
        try:
            return next(self.iterator)
        except StopIteration:
            self.epoch += 1
            _set_epoch(self.loader, self.epoch)
            self.iterator = iter(self.loader)
            return next(self.iterator)


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    """``set_epoch`` on the loader's sampler (or its batch sampler's)."""
    for sampler in (getattr(loader, 'sampler', None),
                    getattr(
                        getattr(loader, 'batch_sampler', None), 'sampler',
                        None)):
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)
            return


class TaskLoaders:
    """One dataloader per task, seen by the runner as one dataloader.

    Args:
        loaders (dict[str, DataLoader]): Stock dataloader per task.
        length (str | int): What ``len()`` returns: ``'max'`` (training: an
            "epoch" sees the largest dataset once), ``'sum'`` (evaluation:
            the batches of every task, run one task after the other) or a
            given number (distributed ``split`` placement: the same on every
            rank).
    """

    def __init__(self,
                 loaders: Mapping[str, DataLoader],
                 length: Union[str, int] = 'max') -> None:
        if length not in ('max', 'sum') and not isinstance(length, int):
            raise ValueError(f"length must be 'max', 'sum' or an int, got "
                             f'{length!r}')
        self.length = length
        self.set_loaders(loaders)
        self.before_batch: Optional[Callable[[int], None]] = None

    def set_loaders(self, loaders: Mapping[str, DataLoader]) -> None:
        """Replace the loaders (a new placement): iteration continues with
        a fresh iterator for every replaced or added loader."""
        self.loaders: Dict[str, DataLoader] = OrderedDict(loaders)
        self.dataset = _TaskDatasets({
            task: loader.dataset
            for task, loader in self.loaders.items()
        })
        self.sampler = _TaskSamplers(self.loaders)

    @property
    def batch_size(self) -> Dict[str, Optional[int]]:
        """Batch size per task (of its batch sampler, when it has one)."""
        return {
            t: ld.batch_size or getattr(ld.batch_sampler, 'batch_size', None)
            for t, ld in self.loaders.items()
        }

    def keys(self) -> List[str]:
        return list(self.loaders.keys())

    def items(self):
        return self.loaders.items()

    def values(self):
        return self.loaders.values()

    def __getitem__(self, task: str) -> DataLoader:
        return self.loaders[task]

    def __contains__(self, task: str) -> bool:
        return task in self.loaders

    def __len__(self) -> int:
        if isinstance(self.length, int):
            return self.length
        lengths = [len(loader) for loader in self.loaders.values()]
        return max(lengths) if self.length == 'max' else sum(lengths)

    def __iter__(self) -> _TaskBatches:
        """Endless ``{task: batch}`` batches (see :class:`_TaskBatches`)."""
        return _TaskBatches(self)


def task_keys(cfgs: Any, where: str) -> List[str]:
    """The task names of a per-task dict of the config, checked."""
    if isinstance(cfgs, TaskLoaders):
        return cfgs.keys()
    if not isinstance(cfgs, Mapping) or not cfgs:
        raise TypeError(f'{where} must be a non-empty dict keyed by task '
                        f'for the SIMT loops, got {type(cfgs).__name__}')
    looks_single = {'dataset', 'batch_size', 'sampler', 'type', 'metrics'}
    if looks_single & set(cfgs):
        raise TypeError(
            f'{where} looks like a single {where.split("_")[-1]} config '
            f'(keys {sorted(cfgs)}); the SIMT loops take a dict keyed by '
            f'task: {where}=dict(<task>=dict(...), ...)')
    return [check_task_name(task) for task in cfgs]


def model_tasks(runner) -> List[str]:
    """Task names of the runner's (possibly wrapped) multi-task model."""
    model = runner.model.module if is_model_wrapper(
        runner.model) else runner.model
    names = getattr(model, 'task_names', None)
    if names is None:
        raise TypeError(
            f'the SIMT loops need a multi-task model with `task_names` '
            f'(e.g. type=\'GPPF\'), got {type(model).__name__}')
    return list(names)


def shard_loader_cfg(cfg: Any,
                     rank: int,
                     world_size: int,
                     where: str,
                     offset: int = 0) -> dict:
    """A dataloader config that reads shard ``rank`` of ``world_size``.

    mmengine's samplers shard over all ranks; under the ``split`` placement
    a task's dataset is sharded over the ranks that run the task instead.
    The config's ``InfiniteSampler`` or ``DefaultSampler`` becomes a
    :class:`TaskShardSampler` with the same arguments, hence the same index
    stream (a ``TaskShardSampler`` is sharded again).

    Args:
        cfg (dict): The task's dataloader config.
        rank (int): This rank's position among the task's ranks.
        world_size (int): Number of ranks that run the task.
        where (str): Name of the config, for errors.
        offset (int): ``InfiniteSampler`` only: positions of its endless
            index stream already used (by the ranks that ran the task
            before a new placement); this shard continues after them.

    Raises:
        TypeError: A built ``DataLoader``, another sampler type, or an
            offset for a sampler that is not an ``InfiniteSampler``
            (naming ``where``).
    """
    built = cfg if not isinstance(cfg, Mapping) else cfg.get('sampler')
    if built is not None and not isinstance(built, Mapping):
        raise TypeError(
            f"{where}: placement 'split' builds each task's sampler for the "
            'ranks that run the task and needs a dataloader config with a '
            f'sampler config, got a built {type(built).__name__}')
    cfg = copy.deepcopy(dict(cfg))
    sampler = dict(cfg.get('sampler') or {})
    kind = sampler.pop('type', '')
    name = (kind if isinstance(kind, str) else getattr(kind, '__name__',
                                                       '')).split('.')[-1]
    shown = name or 'a dataloader without a sampler config'
    if name == 'TaskShardSampler':
        infinite = sampler.get('infinite', True)
    else:
        infinite = name == 'InfiniteSampler'
    if offset and not infinite:
        raise TypeError(f'{where}: only an InfiniteSampler can continue its '
                        f'index stream on other ranks, got {shown}')
    if name not in ('InfiniteSampler', 'DefaultSampler', 'TaskShardSampler'):
        raise TypeError(
            f"{where}: placement 'split' shards each task's dataset over the "
            'ranks that run the task and can do so for mmengine\'s '
            f'InfiniteSampler and DefaultSampler, not {shown}')
    cfg['sampler'] = dict(
        sampler,
        type='TaskShardSampler',
        infinite=infinite,
        rank=rank,
        world_size=world_size,
        offset=offset)
    return cfg


def _diff_rank_seed(runner) -> bool:
    """``randomness.diff_rank_seed`` of the run's config (False if unset,
    or for a runner built without a config)."""
    randomness = (getattr(runner, 'cfg', None) or {}).get('randomness')
    return bool((randomness or {}).get('diff_rank_seed', False))


def _empty_dataset(cfg: Any) -> bool:
    """Whether the stock dataset of the config ``cfg`` has no sample.

    Built again without serialisation: mmengine's ``BaseDataset`` fails to
    serialise an empty data list. False when that build fails too.
    """
    from mmengine.registry import DATASETS
    while isinstance(cfg, Mapping) and cfg.get('type') in ('GuardedDataset',
                                                           GuardedDataset):
        cfg = cfg.get('dataset')
    if not isinstance(cfg, Mapping):
        return False
    try:
        return len(DATASETS.build(dict(cfg, serialize_data=False))) == 0
    except Exception:
        return False


def _reraise(err: Exception, prefix: str) -> None:
    msg = f'{prefix}: {err.args[0] if len(err.args) == 1 else err}'
    try:
        new = type(err)(msg)
    except Exception:  # exceptions with unusual constructors
        new = RuntimeError(msg)
    raise new from err


def train_loader_cfg(cfg: Any, task: str, seed: Optional[int],
                     max_retries: int) -> Any:
    """A task's training dataloader config, resumable and guarded.

    The stock dataset is wrapped in a :class:`GuardedDataset` (samples load
    with their own seeds; bad samples are replaced and reported) and the
    stock batch sampler (or torch's default one) in a
    :class:`ResumableBatchSampler` (endless, skippable without loading,
    seeding every sample). A built ``DataLoader`` is returned as it is.
    """
    if not isinstance(cfg, Mapping):
        return cfg
    cfg = copy.deepcopy(dict(cfg))
    dataset = cfg.get('dataset')
    if isinstance(dataset,
                  Mapping) and dataset.get('type') not in ('GuardedDataset',
                                                           GuardedDataset):
        if scope_of(dataset):
            dataset = with_scope(dataset, '')
        cfg['dataset'] = dict(
            type='GuardedDataset',
            dataset=dataset,
            task=task,
            max_retries=max_retries)
    sampler = dict(
        type='ResumableBatchSampler',
        batch_sampler=cfg.pop('batch_sampler', None),
        seed=seed,
        stream=task)
    if 'drop_last' in cfg:
        sampler['drop_last'] = cfg.pop('drop_last')
    cfg['batch_sampler'] = sampler
    return cfg


def build_task_loaders(runner, cfgs: Mapping[str, Union[DataLoader, dict]],
                       where: str) -> Dict[str, DataLoader]:
    """Build one stock dataloader per task with ``runner.build_dataloader``.

    A dataset dict whose type is prefixed (``'mmdet.CocoDataset'``) gets the
    matching ``_scope_`` so that its pipeline resolves in its library.

    Raises:
        ValueError: A task's dataset is empty (naming the task).
    """
    diff_rank_seed = _diff_rank_seed(runner)
    loaders: Dict[str, DataLoader] = OrderedDict()
    for task in task_keys(cfgs, where):
        cfg = cfgs[task]
        try:
            if isinstance(cfg, Mapping):
                cfg = copy.deepcopy(dict(cfg))
                dataset = cfg.get('dataset')
                if isinstance(dataset, Mapping) and scope_of(dataset):
                    cfg['dataset'] = with_scope(dataset, '')
                cfg = runner.build_dataloader(
                    cfg, seed=runner.seed, diff_rank_seed=diff_rank_seed)
        except Exception as e:
            dataset = cfg.get('dataset') if isinstance(cfg, Mapping) else None
            if _empty_dataset(dataset):
                while dataset.get('type') in ('GuardedDataset',
                                              GuardedDataset):
                    dataset = dataset['dataset']
                raise ValueError(f'{where}[{task!r}]: the dataset is empty '
                                 f'({dataset.get("type")}, ann_file='
                                 f'{dataset.get("ann_file")!r}, data_root='
                                 f'{dataset.get("data_root")!r})') from e
            _reraise(e, f'{where}[{task!r}]')
        dataset = cfg.dataset
        if len(dataset) == 0:
            raise ValueError(
                f'{where}[{task!r}]: the dataset is empty '
                f'({type(dataset).__name__}, '
                f'ann_file={getattr(dataset, "ann_file", None)!r}, '
                f'data_root={getattr(dataset, "data_root", None)!r})')
        loaders[task] = cfg
    return loaders


def build_task_evaluators(runner, cfgs: Mapping[str, Any],
                          where: str) -> Dict[str, Evaluator]:
    """Build one stock evaluator per task with ``runner.build_evaluator``.

    Each entry is a metric dict, a list of them, ``dict(metrics=...)`` or an
    :class:`Evaluator`; prefixed metric types get their ``_scope_``.

    Raises:
        KeyError: Unknown metric type (naming the task).
    """
    evaluators: Dict[str, Evaluator] = OrderedDict()
    for task in task_keys(cfgs, where):
        cfg = cfgs[task]
        try:
            evaluators[task] = runner.build_evaluator(_scope_metrics(cfg))
        except Exception as e:
            _reraise(e, f'{where}[{task!r}]')
    return evaluators


def _scope_metrics(cfg: Any) -> Any:
    if isinstance(cfg, (list, tuple)):
        return [_scope_metrics(c) for c in cfg]
    if isinstance(cfg, Mapping):
        if 'metrics' in cfg:
            cfg = copy.deepcopy(dict(cfg))
            cfg['metrics'] = _scope_metrics(cfg['metrics'])
            return cfg
        if scope_of(cfg):
            return with_scope(cfg, '')
    return cfg
