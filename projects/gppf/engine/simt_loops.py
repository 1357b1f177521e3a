"""SIMT val and test loops, and the check of a SIMT config.

``val_dataloader``/``val_evaluator`` and ``test_dataloader``/
``test_evaluator`` are dicts keyed by task; each entry is a stock
dataloader / metric config of the task's own library. Example::

    val_cfg = dict(type='SIMTValLoop')
    test_cfg = dict(type='SIMTTestLoop')

Evaluation runs task after task, each with its own evaluator, and reports
metrics as ``<task>/<metric>``. The train loop is in :mod:`.simt_train_loop`.
"""
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from mmengine.evaluator import Evaluator
from mmengine.logging import print_log
from mmengine.registry import LOOPS
from mmengine.runner.amp import autocast
from mmengine.runner.base_loop import BaseLoop

from ..models.task_config import check_task_sets
from ..models.task_context import use_task
from ..utils.random_state import isolated_random_state
from .task_loaders import (TaskLoaders, build_task_evaluators,
                           build_task_loaders, model_tasks, task_keys)

__all__ = ['SIMTValLoop', 'SIMTTestLoop', 'metrics_table', 'check_simt_cfg']


class _SIMTEvalLoop(BaseLoop):
    """Shared body of :class:`SIMTValLoop` and :class:`SIMTTestLoop`."""

    mode = 'val'

    def __init__(self,
                 runner,
                 dataloader: Mapping[str, Any],
                 evaluator: Mapping[str, Any],
                 fp16: bool = False,
                 tasks: Optional[Sequence[str]] = None) -> None:
        self._runner = runner
        all_tasks = model_tasks(runner)
        if tasks is not None:
            unknown = [t for t in tasks if t not in all_tasks]
            if unknown or not tasks:
                raise ValueError(
                    f'{self.mode}_cfg.tasks={list(tasks)} must name some of '
                    f'the model tasks {all_tasks}')
            print_log(
                f'{self.mode}: evaluating {list(tasks)}; not evaluated: '
                f'{[t for t in all_tasks if t not in tasks]}',
                logger='current')
        check_task_sets({
            (f'{self.mode}_cfg.tasks' if tasks is not None else 'model.tasks'):
            list(tasks) if tasks is not None else all_tasks,
            f'{self.mode}_dataloader':
            task_keys(dataloader, f'{self.mode}_dataloader'),
            f'{self.mode}_evaluator':
            task_keys(evaluator, f'{self.mode}_evaluator'),
        })
        loaders = build_task_loaders(runner, dataloader,
                                     f'{self.mode}_dataloader')
        self.evaluator: Dict[str, Evaluator] = build_task_evaluators(
            runner, evaluator, f'{self.mode}_evaluator')
        for task, loader in loaders.items():
            if hasattr(loader.dataset, 'metainfo'):
                self.evaluator[task].dataset_meta = loader.dataset.metainfo
        self.dataloader = TaskLoaders(loaders, length='sum')
        self.fp16 = fp16

    @property
    def tasks(self) -> List[str]:
        """Task names, in evaluation order."""
        return self.dataloader.keys()

    def run(self) -> Dict[str, Any]:
        """Evaluate every task with its evaluator; metrics are prefixed
        ``<task>/`` and a per-task table is logged. The process-wide random
        streams are left as they were (an evaluation inside training does
        not change what training draws next)."""
        with isolated_random_state():
            return self._evaluate()

    def _evaluate(self) -> Dict[str, Any]:
        mode = self.mode
        self.runner.call_hook(f'before_{mode}')
        self.runner.call_hook(f'before_{mode}_epoch')
        self.runner.model.eval()
        metrics: Dict[str, Any] = OrderedDict()
        per_task: Dict[str, Dict[str, Any]] = OrderedDict()
        idx = 0
        for task, loader in self.dataloader.items():
            if hasattr(loader.dataset, 'metainfo'):
                self.runner.visualizer.dataset_meta = loader.dataset.metainfo
            for data_batch in loader:
                self.run_iter(idx, data_batch, task)
                idx += 1
            per_task[task] = self.evaluator[task].evaluate(len(loader.dataset))
            metrics.update(
                (f'{task}/{k}', v) for k, v in per_task[task].items())
        print_log(
            f'{mode} metrics per task:\n' + metrics_table(per_task),
            logger='current')
        self.runner.call_hook(f'after_{mode}_epoch', metrics=metrics)
        self.runner.call_hook(f'after_{mode}')
        return metrics

    @torch.no_grad()
    def run_iter(self, idx: int, data_batch: Any, task: str) -> None:
        """Predict one batch of ``task`` and feed its evaluator.

        Args:
            idx (int): Index of the batch over all tasks.
            data_batch (dict): One batch of the task's dataloader.
            task (str): The task.
        """
        mode = self.mode
        self.runner.call_hook(
            f'before_{mode}_iter', batch_idx=idx, data_batch=data_batch)
        step = getattr(self.runner.model, f'{mode}_step')
        with autocast(enabled=self.fp16), use_task(task):
            outputs = step(data_batch)
        self.evaluator[task].process(
            data_samples=outputs, data_batch=data_batch)
        self.runner.call_hook(
            f'after_{mode}_iter',
            batch_idx=idx,
            data_batch=data_batch,
            outputs=outputs)


@LOOPS.register_module()
class SIMTValLoop(_SIMTEvalLoop):
    """Validate every task with its own evaluator.

    Args:
        runner (Runner): The runner.
        dataloader (dict[str, dict | DataLoader]): ``val_dataloader`` per
            task.
        evaluator (dict[str, dict | list | Evaluator]): ``val_evaluator``
            per task (e.g. ``dict(type='mmdet.CocoMetric', ...)``).
        fp16 (bool): Run prediction under fp16 autocast. Default: False.
        tasks (list[str], optional): Evaluate only these tasks (e.g. a
            pre-training task without a validation set); the dataloader and
            evaluator dicts must then name exactly them. Default: every
            model task.
    """

    mode = 'val'


@LOOPS.register_module()
class SIMTTestLoop(_SIMTEvalLoop):
    """Test every task with its own evaluator (arguments as
    :class:`SIMTValLoop`, with ``test_dataloader``/``test_evaluator``)."""

    mode = 'test'


def metrics_table(per_task: Mapping[str, Mapping[str, Any]]) -> str:
    """A table with one row per (task, scalar metric).

    Args:
        per_task (dict[str, dict]): Each task's metrics, unprefixed.

    Returns:
        str: The table as text.
    """
    from prettytable import PrettyTable
    table = PrettyTable(field_names=['task', 'metric', 'value'])
    table.align['task'] = table.align['metric'] = 'l'
    table.align['value'] = 'r'
    for task, task_metrics in per_task.items():
        first = True
        for name, value in task_metrics.items():
            value = _scalar(value)
            if value is None:
                continue
            table.add_row([task if first else '', name, f'{value:.4f}'])
            first = False
        if first:
            table.add_row([task, '(none)', ''])
    return table.get_string()


def _scalar(value: Any) -> Union[float, None]:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:  # numpy scalars
        import numpy as np
        if isinstance(value, np.generic) or (isinstance(value, np.ndarray)
                                             and value.size == 1):
            return float(value)
    except ImportError:  # pragma: no cover
        pass
    return None


def check_simt_cfg(cfg: Mapping) -> None:
    """Catch a task-keyed dataloader given to a stock loop (tools use it).

    mmengine's own loops would fail deep inside ``build_dataloader`` with a
    ``KeyError: 'dataset'``; this names the fix instead.
    """
    pairs = (('train_dataloader', 'train_cfg',
              'SIMTTrainLoop'), ('val_dataloader', 'val_cfg', 'SIMTValLoop'),
             ('test_dataloader', 'test_cfg', 'SIMTTestLoop'))
    for loader_key, loop_key, loop_type in pairs:
        loader = cfg.get(loader_key)
        loop = cfg.get(loop_key) or {}
        if not isinstance(loader, Mapping) or 'dataset' in loader:
            continue
        if loop.get('type') not in (loop_type, f'gppf.{loop_type}'):
            raise ValueError(
                f'{loader_key} is a dict keyed by task '
                f'({", ".join(map(str, loader))}) but {loop_key} is '
                f'{dict(loop)!r}: set {loop_key}=dict(type={loop_type!r}, '
                '...)')
