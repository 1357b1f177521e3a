"""RouteSearchHook: find a new task's route with the lego units frozen."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..models.lego.backbone_mixin import LegoBackboneMixin
from .task_router_hook import TaskRouterHook

__all__ = ['RouteSearchHook']


@HOOKS.register_module()
class RouteSearchHook(Hook):
    """Searches the routes of ``tasks`` first, then fine-tunes on them.

    Iterations ``[0, search_iters)``: inside every lego backbone only the
    router logits train (they choose the route and give its gates); the
    units, norms and stem keep their weights while the rest of the model (a
    new neck or head) trains. The routes of ``tasks`` are free, chosen with
    selection noise annealed linearly from ``noise_std[0]`` to
    ``noise_std[1]``. At ``search_iters`` the noise-free routes freeze and
    every parameter the hook froze trains again. A run resumed past
    ``search_iters`` keeps the frozen routes of its checkpoint.

    Typical use: a downstream task that starts from a pre-training task's
    route (``init_cfg.task_map``, docs/downstream.md) and searches from
    there. The routers take their schedule from this hook, so a
    ``TaskRouterHook`` in the same run is refused. Under DDP build the
    wrapper with ``find_unused_parameters=True``.

    Args:
        search_iters (int): Iterations of the search phase.
        tasks (Sequence[str], optional): Tasks whose routes are searched;
            default every task of every lego backbone.
        noise_std (tuple[float, float]): Selection noise at the start and
            at the end of the search. The default suits logits of the
            scale pre-training leaves (about 0.05).
        reset_logits (bool): Start from equal logits (a route chosen by the
            noise) instead of the loaded ones.
    """

    priority = 'NORMAL'

    def __init__(self,
                 search_iters: int,
                 tasks: Optional[Sequence[str]] = None,
                 noise_std: Sequence[float] = (0.05, 0.0),
                 reset_logits: bool = False) -> None:
        if search_iters < 1:
            raise ValueError(f'search_iters must be >= 1, got {search_iters}')
        if len(noise_std) != 2 or min(noise_std) < 0:
            raise ValueError('noise_std must be (start, end) >= 0, got '
                             f'{noise_std}')
        self.search_iters = search_iters
        self.tasks = list(tasks) if tasks is not None else None
        self.noise_std: Tuple[float, float] = (float(noise_std[0]),
                                               float(noise_std[1]))
        self.reset_logits = reset_logits
        self._frozen: List[nn.Parameter] = []
        self._start: Dict[Tuple[int, str], torch.Tensor] = {}

    def _routed(self, runner) -> List[Tuple[LegoBackboneMixin, List[str]]]:
        """Each lego backbone of the model with the tasks it searches."""
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        backbones = [
            m for m in model.modules() if isinstance(m, LegoBackboneMixin)
        ]
        if not backbones:
            raise RuntimeError('RouteSearchHook found no lego backbone in the '
                               'model (LegoResNet or LegoViT)')
        out = []
        for backbone in backbones:
            tasks = backbone.tasks if self.tasks is None else [
                t for t in self.tasks if t in backbone.tasks
            ]
            out.append((backbone, list(tasks)))
        if self.tasks is not None:
            known = {t for b, _ in out for t in b.tasks}
            unknown = sorted(set(self.tasks) - known)
            if unknown:
                raise KeyError(f'RouteSearchHook: tasks {unknown} are not '
                               f'routed by the model; its tasks are '
                               f'{sorted(known)}')
        return out

    def before_train(self, runner) -> None:
        if any(isinstance(h, TaskRouterHook) for h in runner.hooks):
            raise ValueError(
                'RouteSearchHook and TaskRouterHook both schedule the '
                'routers: keep one in custom_hooks')
        routed = self._routed(runner)
        if runner.iter >= self.search_iters:
            return  # resumed after the search: routes are in the checkpoint
        for i, (backbone, tasks) in enumerate(routed):
            router = backbone.router
            if self.reset_logits and runner.iter == 0:
                with torch.no_grad():
                    for task in tasks:
                        router.logits[router.task_index(task)].zero_()
            router.unfreeze(tasks)
            for task in tasks:
                self._start[(i, task)] = router.greedy_indices(task)
            for param in backbone.parameters():
                if param is not router.logits and param.requires_grad:
                    param.requires_grad_(False)
                    self._frozen.append(param)
        print_log(
            f'RouteSearchHook: searching the routes of '
            f'{[t for _, ts in routed for t in ts]} until iteration '
            f'{self.search_iters}; {len(self._frozen)} backbone tensors '
            'frozen until then',
            logger='current')

    def before_train_iter(self,
                          runner,
                          batch_idx: int,
                          data_batch=None) -> None:
        it = runner.iter
        if it > self.search_iters:
            return
        routed = self._routed(runner)
        if it == self.search_iters:
            self._finish(routed)
            return
        start, end = self.noise_std
        noise = start + (end - start) * it / self.search_iters
        for backbone, _ in routed:
            backbone.router.noise_std = noise

    def _finish(self, routed) -> None:
        """Freeze the searched routes and release the frozen parameters."""
        moved = []
        for i, (backbone, tasks) in enumerate(routed):
            router = backbone.router
            router.noise_std = self.noise_std[1]
            router.freeze(tasks)
            for task in tasks:
                route = router.greedy_indices(task)
                start = self._start.get((i, task))
                if start is not None:
                    changed = (route != start.to(route.device)).any(1)
                    moved.append(f'{task}: {int(changed.sum())} of '
                                 f'{len(changed)} layers')
        for param in self._frozen:
            param.requires_grad_(True)
        self._frozen = []
        print_log(
            'RouteSearchHook: routes frozen; layers whose route moved from '
            'the start: ' + ('; '.join(moved) or 'not recorded (resumed)'),
            logger='current')
