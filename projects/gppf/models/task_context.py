"""Which task is running: the one public way to select a task's route.

The multi-task model passes the task explicitly (``task=``) down to the
call of the task's stock ``loss()``/``predict()``, which it wraps in
:func:`use_task`: every :class:`LegoResNet` (or other lego backbone) reads
:func:`current_task` in its ``forward`` to pick that task's route. Stock
detectors, segmentors and classifiers therefore need no change.

Example:
    >>> with use_task('coco_det'):
    ...     losses = detector.loss(inputs, data_samples)
"""
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional, Sequence

__all__ = ['use_task', 'current_task', 'resolve_task']

_CURRENT_TASK: ContextVar[Optional[str]] = ContextVar(
    'gppf_current_task', default=None)


@contextmanager
def use_task(task: str) -> Iterator[str]:
    """Make ``task`` the active task inside the ``with`` block (re-entrant)."""
    if not isinstance(task, str) or not task:
        raise TypeError(f'task must be a non-empty str, got {task!r}')
    token = _CURRENT_TASK.set(task)
    try:
        yield task
    finally:
        _CURRENT_TASK.reset(token)


def current_task() -> Optional[str]:
    """The task set by the innermost :func:`use_task`, or ``None``."""
    return _CURRENT_TASK.get()


def resolve_task(task: Optional[str], tasks: Sequence[str], owner: str) -> str:
    """The task a call is for: ``task``, else :func:`current_task` (what a
    loop sets around a model wrapper's ``val_step(data)``), else the only
    one of ``tasks``.

    Args:
        task (str, optional): The task the caller passed.
        tasks (list[str]): The tasks ``owner`` knows.
        owner (str): Named in the errors (``'GPPF'``).

    Raises:
        RuntimeError: No task given and several tasks.
        KeyError: The task is not one of ``tasks``.
    """
    task = task or current_task()
    if task is None:
        if len(tasks) != 1:
            raise RuntimeError(f'{owner} needs a task: pass task= or run '
                               f'inside use_task(name); tasks: {list(tasks)}')
        return tasks[0]
    if task not in tasks:
        raise KeyError(f'unknown task {task!r}; {owner} tasks: {list(tasks)}')
    return task
