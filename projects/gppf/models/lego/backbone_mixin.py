"""The routing side every lego backbone shares.

:class:`LegoBackboneMixin` holds what :class:`LegoResNet` and
:class:`LegoViT` do alike: check the routing arguments, build the
:class:`TaskRouter`, pick the task a forward pass runs, hand out the
router's balance loss, and keep the lego layout in the extra state so that
a checkpoint of another layout fails to load. Each backbone supplies
:meth:`lego_layout` (and may amend an old checkpoint's layout in
:meth:`_upgrade_layout`); messages name the backbone's class.
"""
from typing import Dict, List, Optional, Sequence, Union

import torch

from ..task_context import current_task
from .packed_state import pack_state, unpack_state
from .router import TaskRouter

__all__ = ['LegoBackboneMixin']


class LegoBackboneMixin:
    """Mixin (before ``BaseModule``) for a backbone of lego layers routed
    per task by ``self.router``; sets ``num_legos``, ``num_active``,
    ``task``."""

    router: TaskRouter

    def _check_routing(self, num_legos: int, num_active: int,
                       tasks: Sequence[str], task: Optional[str]) -> List[str]:
        """Check k of N and the default task; keep them; return the tasks."""
        if not 1 <= num_active <= num_legos:
            raise ValueError(f'num_active must be in [1, num_legos], got '
                             f'num_active={num_active}, num_legos={num_legos}')
        tasks = list(tasks)
        if task is not None and task not in tasks:
            raise KeyError(f'task={task!r} is not one of tasks={tasks}')
        self.num_legos = num_legos
        self.num_active = num_active
        self.task = task
        return tasks

    def _build_router(self, tasks: List[str], num_layers: int,
                      router: Optional[dict]) -> None:
        """``self.router``: ``num_layers`` lego layers of ``tasks``."""
        self.router = TaskRouter(tasks, num_layers, self.num_legos,
                                 self.num_active, **(router or {}))

    @property
    def tasks(self) -> List[str]:
        return self.router.tasks

    # ------------------------------------------------------------ routing
    def active_task(self) -> str:
        """The task this forward pass runs: the :func:`use_task` context's,
        else ``task``, else the only task."""
        task = current_task()
        if task is not None:
            self.router.task_index(task)  # unknown names fail here
            return task
        if self.task is not None:
            return self.task
        if len(self.tasks) == 1:
            return self.tasks[0]
        raise RuntimeError(
            f'{type(self).__name__} routes the tasks {self.tasks} and none '
            'is active: run it inside projects.gppf.use_task(name) or build '
            'it with task=name')

    def aux_loss(self) -> torch.Tensor:
        """The router's weighted balance loss of the tasks routed since the
        last call; resets the record of routed tasks."""
        loss = self.router.aux_loss()
        self.router.reset_usage()
        return loss

    # ------------------------------------------------------------ layout
    def lego_layout(self) -> Dict[str, object]:
        """What a checkpoint of this backbone must match to load."""
        raise NotImplementedError

    def _upgrade_layout(self, given: dict) -> dict:
        """A checkpoint's layout in today's terms (default: as given)."""
        return given

    def get_extra_state(self) -> torch.Tensor:
        return pack_state(dict(lego_layout=self.lego_layout()))

    def set_extra_state(self, state: Union[torch.Tensor, dict]) -> None:
        given = unpack_state(state).get('lego_layout')
        if given is None:
            return
        given = self._upgrade_layout(given)
        expected = self.lego_layout()
        if given != expected:
            diff = {
                k: (expected.get(k), given.get(k))
                for k in expected.keys() | given.keys()
                if expected.get(k) != given.get(k)
            }
            raise ValueError(
                'checkpoint has a different lego layout; build the '
                f"{type(self).__name__} with the checkpoint's values "
                '(expected vs given): ' +
                ', '.join(f'{k}={v[0]!r} vs {v[1]!r}'
                          for k, v in sorted(diff.items())))
