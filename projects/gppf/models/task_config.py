"""Helpers for the per-task dicts of a GPPF config: scopes and task sets.

Every multi-task piece of a GPPF config is a dict keyed by task name: the
model's ``tasks``, the data preprocessor's ``preprocessors``,
``loss_weights``, ``train_dataloader``, ``val_dataloader``,
``val_evaluator``. Two things go wrong with such dicts, and both are checked
here, before the first iteration:

* **Scope.** mmdet, mmseg and mmpretrain register classes with the same names
  and different signatures (``CrossEntropyLoss``, ``ResNet``). A prefixed type
  (``'mmseg.EncoderDecoder'``) builds the right class, but what that class
  builds inside (its head's losses, a dataset's pipeline) comes from the
  *default scope's* library. :func:`with_scope` therefore turns the prefix
  into ``_scope_`` so that the whole sub-tree is built in its own library.
* **Task sets.** A task present in one dict and absent from another.
  :func:`check_task_sets` names the task and the missing piece.
"""
import copy
from typing import Any, Dict, Iterable, List, Mapping, Optional

from mmengine.config import ConfigDict

__all__ = ['scope_of', 'with_scope', 'check_task_sets', 'check_task_name']


def scope_of(cfg: Mapping) -> Optional[str]:
    """The library a config dict builds in: ``_scope_`` or its type prefix.

    Args:
        cfg (Mapping): A config dict with ``type``.

    Returns:
        str or None: e.g. ``'mmdet'`` for ``dict(type='mmdet.FasterRCNN')``
        or ``dict(_scope_='mmdet', type='FasterRCNN')``; ``None`` if neither
        is given.
    """
    scope = cfg.get('_scope_')
    if scope:
        return scope
    obj_type = cfg.get('type')
    if isinstance(obj_type, str) and '.' in obj_type:
        return obj_type.split('.', 1)[0]
    return None


def with_scope(cfg: Mapping,
               where: str,
               required: bool = False,
               default: Optional[str] = None) -> ConfigDict:
    """A deep copy of ``cfg`` whose ``_scope_`` is set from its type prefix.

    Args:
        cfg (Mapping): A config dict with ``type``.
        where (str): Where the dict sits, for error messages, e.g.
            ``"model.tasks['coco_det']"``.
        required (bool): Raise if no scope can be found. Default: False.
        default (str, optional): Scope to use when the dict names none.

    Returns:
        ConfigDict: The copy, with ``_scope_`` when a scope is known.

    Raises:
        TypeError: ``cfg`` is not a dict with ``type``.
        ValueError: ``required`` and no scope is given.
    """
    if not isinstance(cfg, Mapping) or 'type' not in cfg:
        raise TypeError(f'{where} must be a config dict with `type`, got '
                        f'{cfg!r}')
    out = ConfigDict(copy.deepcopy(dict(cfg)))
    scope = scope_of(out) or default
    if scope is None:
        if required:
            raise ValueError(
                f'{where} (type={out["type"]!r}) names no library: write '
                "`_scope_='mmdet'` (or 'mmseg', 'mmpretrain', ...) or a "
                "prefixed type such as 'mmdet.FasterRCNN', so that the "
                'losses and other modules it builds inside come from its '
                'own library')
    else:
        out['_scope_'] = scope
    return out


def check_task_name(task: Any) -> str:
    """Check that ``task`` can key a ``ModuleDict`` and prefix log keys."""
    if not isinstance(task, str) or not task or any(
            c in task for c in './ ') or task.startswith('_'):
        raise ValueError(
            f'invalid task name {task!r}: use a non-empty name without '
            "'.', '/' or spaces that does not start with '_', e.g. "
            "'coco_det'")
    return task


def check_task_sets(
        pieces: Mapping[str, Optional[Iterable[str]]]) -> List[str]:
    """Check that every piece names the same tasks.

    Args:
        pieces (Mapping[str, Iterable[str] | None]): Task names per config
            piece, e.g. ``{'model.tasks': [...], 'train_dataloader': [...]}``.
            ``None`` pieces are skipped.

    Returns:
        list[str]: The tasks, in the order of the first piece.

    Raises:
        ValueError: A task is missing from some pieces; the message names the
            task, the pieces that lack it and the pieces that have it.
    """
    sets: Dict[str, List[str]] = {
        name: list(tasks)
        for name, tasks in pieces.items() if tasks is not None
    }
    ordered: List[str] = []
    for tasks in sets.values():
        ordered.extend(t for t in tasks if t not in ordered)
    problems = []
    for task in ordered:
        missing = [name for name, tasks in sets.items() if task not in tasks]
        if missing:
            present = [name for name in sets if name not in missing]
            problems.append(f"task {task!r} is missing from "
                            f"{', '.join(missing)} (present in "
                            f"{', '.join(present)})")
    if problems:
        raise ValueError('inconsistent GPPF tasks: ' + '; '.join(problems) +
                         '. Every task needs an entry in each of: ' +
                         ', '.join(sets))
    return ordered
