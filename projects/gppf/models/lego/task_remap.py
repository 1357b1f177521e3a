"""Load a lego checkpoint into a backbone that routes other tasks.

A downstream task the checkpoint never saw starts from a named pre-training
task: its route (router logits, frozen route and flags) and the statistics
(and per-task affine) of every norm that keeps them per task are copied from
that task. ``task_map=dict(<new task>=<checkpoint task>)``; the backbone's
other tasks must be tasks of the checkpoint (taken by name). A backbone that
keeps one set of statistics and routes one task takes its source task's.
"""
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional

import torch

from .layers import LegoBatchNorm
from .packed_state import pack_state, unpack_state
from .task_norm import TaskNormMixin

if TYPE_CHECKING:
    from ..backbones.lego_resnet import LegoResNet

__all__ = ['remap_tasks', 'check_lego_source']

_STATS = ('running_mean', 'running_var', 'num_batches_tracked')


def _source_rows(tasks: List[str], given: List[str],
                 task_map: Mapping[str, str]) -> List[int]:
    """Row of the checkpoint each of ``tasks`` takes."""
    unknown = sorted(set(task_map) - set(tasks))
    if unknown:
        raise KeyError(f'task_map names tasks {unknown} that this backbone '
                       f'does not route; its tasks are {tasks}')
    rows = []
    for task in tasks:
        source = task_map.get(task, task)
        if source not in given:
            raise KeyError(
                f'task {task!r} takes the route and norm statistics of '
                f'{source!r}, which the checkpoint does not route; its '
                f'tasks are {given}: give '
                f"init_cfg=dict(..., task_map=dict({task}='<one of them>'))")
        rows.append(given.index(source))
    return rows


def check_lego_source(state: Dict[str, torch.Tensor],
                      task_map: Optional[Mapping[str, str]],
                      owner: str) -> None:
    """Refuse a ``task_map`` (route copy) with a checkpoint that holds no
    lego backbone (``owner``: the backbone's class name).

    Raises:
        ValueError: ``task_map`` is set and ``state`` has no lego layout
            (``_extra_state``): a dense backbone, e.g. an export.
    """
    if task_map and not {'_extra_state', 'router.logits'} & set(state):
        raise ValueError(
            f'{owner}: init_cfg.task_map={dict(task_map)} copies routes from '
            f'a lego checkpoint, but the checkpoint holds no {owner} under '
            'its prefix (no lego layout, router or units): it is a dense '
            'backbone (a lego2resnet.py / lego2vit.py export?). Give the '
            "GPPF checkpoint with prefix 'backbone.', or drop task_map and "
            'load the export into the stock backbone (docs/downstream.md)')


def remap_tasks(backbone: 'LegoResNet', state: Dict[str, torch.Tensor],
                task_map: Mapping[str, str]) -> Dict[str, torch.Tensor]:
    """``state`` (a LegoResNet state dict) rewritten for ``backbone``'s
    tasks: per-task rows and keys taken from the mapped checkpoint tasks.

    Raises:
        KeyError: a task maps to no task of the checkpoint.
        ValueError: the backbone keeps one set of statistics for several
            tasks but the checkpoint keeps them per task.
    """
    extra = unpack_state(state['_extra_state'])
    layout = dict(extra['lego_layout'])
    given = list(layout['tasks'])
    tasks = list(backbone.tasks)
    rows = _source_rows(tasks, given, task_map)
    index = torch.tensor(rows, dtype=torch.long)
    out = dict(state)
    for key in ('router.logits', 'router.frozen_indices'):
        if key in out:
            out[key] = out[key].index_select(0, index)
    if 'router._extra_state' in out:
        router = unpack_state(out['router._extra_state'])
        router.update(
            tasks=tasks,
            frozen=[router['frozen'][r] for r in rows],
            num_calls=[router['num_calls'][r] for r in rows])
        out['router._extra_state'] = pack_state(router)
    squeeze = False
    for name, module in backbone.named_modules():
        if getattr(module, 'running_mean', None) is None:
            continue
        ours_per_task = isinstance(module, TaskNormMixin) or (
            isinstance(module, LegoBatchNorm) and module.num_tasks is not None)
        for stat in _STATS:
            key = f'{name}.{stat}'
            value = out.get(key)
            rows_dim = 1 if stat == 'num_batches_tracked' else 2
            if value is None or value.dim() != rows_dim:
                continue  # one set for all tasks: the norms replicate it
            if ours_per_task:
                out[key] = value.index_select(0, index)
            else:
                squeeze = True
                out[key] = value[rows[0]]
        for part in ('weight', 'bias'):
            keys = [f'{name}.task_{part}.{i}' for i in range(len(given))]
            if keys[0] not in out:
                continue
            old = [out.pop(k) for k in keys]
            if getattr(module, 'task_affine', False):
                for j, r in enumerate(rows):
                    out[f'{name}.task_{part}.{j}'] = old[r]
            else:
                squeeze = True
                out[f'{name}.{part}'] = old[rows[0]]
    if squeeze and len(tasks) > 1:
        raise ValueError(
            f'the checkpoint keeps norm statistics per task '
            f"(task_norm={layout.get('task_norm')!r}); a backbone that "
            f'keeps one set cannot take them for its {len(tasks)} tasks: '
            "build it with task_norm='stats' or 'affine'")
    # The norms take the rows selected here and replicate one set.
    layout['task_norm'] = backbone.task_norm
    layout['tasks'] = tasks
    extra['lego_layout'] = layout
    out['_extra_state'] = pack_state(extra)
    return out
