"""Which task is running: the one public way to select a task's route.

The multi-task model wraps each task's stock ``loss()``/``predict()`` call in
:func:`use_task`; every :class:`LegoResNet` (or other lego backbone) reads
:func:`current_task` in its ``forward`` to pick that task's route. Stock
detectors, segmentors and classifiers therefore need no change.

Example:
    >>> with use_task('coco_det'):
    ...     losses = detector.loss(inputs, data_samples)
"""
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional

__all__ = ['use_task', 'current_task']

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
