"""GPPF: one shared backbone and, per task, a stock OpenMMLab model.

Each task is the model its own library builds from its usual config (an
mmdet detector, an mmseg segmentor, an mmpretrain classifier), except that
its ``backbone`` attribute is the one shared backbone. Nothing of the three
libraries is re-implemented: ``loss()``, ``predict()`` and ``parse_losses()``
are the stock ones; the task is passed explicitly down to the stock call,
which runs inside :func:`use_task` so that a lego backbone picks the task's
route.

One SIMT training iteration, :meth:`GPPF.train_step`, reads like
detectron2's ``SimpleTrainer.run_step``: per task, preprocess, stock loss,
weighted backward; then the router's auxiliary loss; then one optimizer
iteration. Where it runs (one process, or one rank of several) is a
:class:`SingleProcessStep` (the default) or the distributed wrapper's
subclass of it.
"""
import copy
import inspect
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import (Any, ContextManager, Dict, List, Mapping, Optional, Tuple,
                    Union)

import torch
import torch.nn as nn
from mmengine.config import ConfigDict
from mmengine.logging import print_log
from mmengine.model import BaseModel, ModuleDict
from mmengine.optim import OptimWrapper
from mmengine.registry import MODELS
from mmengine.utils import is_list_of

from .nonfinite import NonFiniteGuard, scales_loss
from .task_config import check_task_name, check_task_sets, with_scope
from .task_context import resolve_task, use_task

__all__ = ['GPPF', 'SharedBackboneSlot', 'SingleProcessStep']

ForwardResults = Union[Dict[str, torch.Tensor], list, tuple, torch.Tensor]
#: a loss and its log variables, as ``BaseModel.parse_losses`` returns them
LossAndLogs = Tuple[torch.Tensor, Dict[str, torch.Tensor]]


@MODELS.register_module()
class SharedBackboneSlot(nn.Module):
    """Stands in for a task model's own backbone while it is built.

    :class:`GPPF` builds each task model with this slot as its ``backbone``
    (so no throwaway backbone is built per task) and then points the task
    model's ``backbone`` attribute at the shared backbone.
    """

    def forward(self, *args, **kwargs):
        raise RuntimeError('SharedBackboneSlot is a placeholder that GPPF '
                           'replaces with the shared backbone')


@MODELS.register_module()
class GPPF(BaseModel):
    """Multi-task model: a shared backbone and a stock model per task.

    Example::

        model = dict(
            type='GPPF',
            backbone=dict(type='LegoResNet', depth=50, ...),
            tasks=dict(
                coco_det=dict(_scope_='mmdet', type='FasterRCNN', ...),
                ade20k_seg=dict(_scope_='mmseg', type='EncoderDecoder', ...),
                in1k_cls=dict(_scope_='mmpretrain', type='ImageClassifier',
                              ...)),
            loss_weights=dict(coco_det=1.0, ade20k_seg=1.0, in1k_cls=1.0),
            data_preprocessor=dict(type='MultiTaskDataPreprocessor',
                                   preprocessors=dict(...)))

    Each task config must name its library (``_scope_`` or a prefixed
    ``type``): it is built entirely in that library, so its nested losses
    come from it. Its ``backbone`` entry, if any, is ignored (the shared one
    is used); its ``data_preprocessor`` entry, if any, is moved into the
    :class:`MultiTaskDataPreprocessor` unless that already has one for the
    task. The backbone appears once in the state dict (``backbone.*``); task
    heads and necks under ``tasks.<task>.*``.

    Args:
        backbone (dict): The shared backbone. If its class takes ``tasks``
            (a lego backbone) and the dict gives none, the task names are
            passed in (sorted).
        tasks (dict[str, dict]): Stock model config per task name.
        loss_weights (dict[str, float], optional): Weight per task; ``None``
            weighs every task 1. Given, it must name exactly the tasks.
        aux_loss_weight (float): Weight of the backbone's ``aux_loss()``
            (the router's balance loss), if it has one. Default: 1.
        data_preprocessor (dict, optional): A
            :class:`MultiTaskDataPreprocessor` config; built from the tasks'
            own ``data_preprocessor`` entries when omitted.
        sync_task_time (bool): Synchronise CUDA before reading each task's
            time in :meth:`train_step`, so ``<task>/time`` is the task's real
            cost. Default: True.
        nonfinite (dict, optional): How a task whose loss, norm statistics
            or gradient is not finite is skipped (:class:`NonFiniteGuard`):
            ``dict(check_grads=True, max_consecutive=20)`` (the defaults).
            The loss and statistics checks are always on.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 backbone: dict,
                 tasks: Mapping[str, dict],
                 loss_weights: Optional[Mapping[str, float]] = None,
                 aux_loss_weight: float = 1.0,
                 data_preprocessor: Optional[dict] = None,
                 sync_task_time: bool = True,
                 nonfinite: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        if not isinstance(tasks, Mapping) or not tasks:
            raise ValueError('GPPF needs tasks=dict(<task name>=<model cfg>,'
                             ' ...) with at least one task')
        task_cfgs = OrderedDict(
            (check_task_name(name),
             with_scope(cfg, f'model.tasks[{name!r}]', required=True))
            for name, cfg in tasks.items())
        names = list(task_cfgs)
        super().__init__(
            data_preprocessor=_preprocessor_cfg(data_preprocessor, task_cfgs),
            init_cfg=init_cfg)
        check_task_sets({
            'model.tasks':
            names,
            'model.data_preprocessor':
            getattr(self.data_preprocessor, 'tasks', None)
        })
        self.loss_weights = _loss_weights(loss_weights, names)
        self.aux_loss_weight = float(aux_loss_weight)
        self.sync_task_time = sync_task_time
        self.nonfinite = NonFiniteGuard.build(nonfinite)

        self.backbone = MODELS.build(_backbone_cfg(backbone, names))
        routes = getattr(self.backbone, 'tasks', None)
        if isinstance(routes, (list, tuple)) and is_list_of(list(routes), str):
            check_task_sets({
                'model.tasks': names,
                'the backbone routes (backbone.tasks)': routes
            })
        # mmengine's ModuleDict: init_weights reaches each task model (a
        # plain nn.ModuleDict has no init_weights, so heads would keep
        # torch's default init instead of their stock one).
        self.tasks = ModuleDict()
        self.task_scopes: Dict[str, str] = {}
        for name, cfg in task_cfgs.items():
            self.task_scopes[name] = cfg['_scope_']
            self.tasks[name] = self._build_task(name, cfg)

    # ------------------------------------------------------------ building
    def _build_task(self, name: str, cfg: ConfigDict) -> nn.Module:
        """Build one stock model in its library with the shared backbone."""
        cfg = copy.deepcopy(cfg)
        if cfg.get('backbone') is not None:
            print_log(
                f"GPPF: model.tasks['{name}'] uses the shared backbone "
                f"instead of its own {cfg['backbone'].get('type')!r}",
                logger='current')
        cfg['backbone'] = ConfigDict(type='SharedBackboneSlot')
        cfg.pop('data_preprocessor', None)
        # Backbone weights of a stock config (mmseg: ``pretrained=``) belong
        # to the shared backbone's ``init_cfg``.
        if cfg.pop('pretrained', None) is not None:
            print_log(
                f"GPPF: model.tasks['{name}'].pretrained is ignored; load "
                "backbone weights through model.backbone's init_cfg",
                logger='current')
        model = MODELS.build(cfg)
        children = dict(model.named_children())
        if not isinstance(children.get('backbone'), SharedBackboneSlot):
            raise TypeError(f'model.tasks[{name!r}] ({type(model).__name__}) '
                            'does not keep its backbone as `.backbone`')
        # Plain references (not sub-modules): the shared backbone and the
        # task's stock preprocessor are registered once, in GPPF.
        delattr(model, 'backbone')
        object.__setattr__(model, 'backbone', self.backbone)
        stock = getattr(self.data_preprocessor, 'preprocessors', {})
        if name in stock and 'data_preprocessor' in children:
            delattr(model, 'data_preprocessor')
            object.__setattr__(model, 'data_preprocessor', stock[name])
        return model

    @property
    def task_names(self) -> List[str]:
        """Task names, in order."""
        return list(self.tasks.keys())

    def _task(self, task: Optional[str]) -> str:
        return resolve_task(task, self.task_names, 'GPPF')

    # ------------------------------------------------------------- forward
    def forward(self,
                inputs: torch.Tensor,
                data_samples: Optional[list] = None,
                mode: str = 'tensor',
                task: Optional[str] = None) -> ForwardResults:
        """Run one task's stock model in ``mode`` with the task's route.

        Args:
            inputs (Tensor): (B, C, H, W) batch from the task's preprocessor.
            data_samples (list, optional): The task library's data samples.
            mode (str): ``'loss'``, ``'predict'`` or ``'tensor'``.
            task (str, optional): The task; else :func:`current_task`, else
                the only task.

        Returns:
            ``'loss'``: dict of losses keyed ``<task>/<loss name>``;
            ``'predict'``: the stock model's list of data samples;
            ``'tensor'``: the stock model's raw outputs.
        """
        task = self._task(task)
        out = self._stock(task, inputs, data_samples, mode)
        if mode == 'loss':
            return OrderedDict((f'{task}/{k}', v) for k, v in out.items())
        return out

    def _stock(self, task: str, inputs: torch.Tensor,
               data_samples: Optional[list], mode: str) -> ForwardResults:
        """The stock model of ``task`` in ``mode``, inside :func:`use_task`
        (what a lego backbone reads to pick the task's route)."""
        with use_task(task):
            return self.tasks[task](inputs, data_samples, mode=mode)

    def loss(self, task: str, inputs: torch.Tensor,
             data_samples: list) -> Dict[str, torch.Tensor]:
        """The stock ``loss()`` of ``task``, keys prefixed ``<task>/``."""
        return self(inputs, data_samples, mode='loss', task=task)

    def predict(self,
                task: str,
                inputs: torch.Tensor,
                data_samples: Optional[list] = None) -> list:
        """The stock ``predict()`` of ``task``: a list of data samples."""
        return self(inputs, data_samples, mode='predict', task=task)

    def task_loss(self, task: str, losses: Mapping[str, Any]) -> LossAndLogs:
        """Parse one task's stock losses with the task model's own
        ``parse_losses`` (mmengine's ``BaseModel.parse_losses``: each value
        mean-reduced, the names containing ``'loss'`` summed) and apply the
        task's weight.

        Args:
            task (str): The task.
            losses (dict): Its stock model's ``loss()`` (unprefixed keys).

        Returns:
            tuple: The weighted loss (0-dim tensor) and the log variables
            ``<task>/<name>`` (unweighted, one per entry of ``losses``).
        """
        loss, parsed = self.tasks[task].parse_losses(losses)
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f'task {task!r}: no loss found among '
                             f'{list(losses)}')
        log_vars = OrderedDict((f'{task}/{k}', parsed[k]) for k in losses)
        return self.loss_weights[task] * loss, log_vars

    def parse_losses(self, losses: Mapping[str, Any]) -> LossAndLogs:
        """Losses of one or several tasks keyed ``<task>/<name>`` (what
        :meth:`loss` returns), parsed per task by :meth:`task_loss`.

        Returns:
            tuple: The weighted total (0-dim tensor) and the log variables:
            ``loss`` (the weighted total) then every ``<task>/<name>``
            (unweighted).
        """
        per_task: Dict[str, Dict[str, Any]] = OrderedDict()
        for key, value in losses.items():
            task, _, name = key.partition('/')
            if not name or task not in self.tasks:
                raise KeyError(f'loss {key!r} is not keyed <task>/<name> '
                               f'with a task of {self.task_names}')
            per_task.setdefault(task, OrderedDict())[name] = value
        if not per_task:
            raise ValueError('no loss found: the losses are empty')
        total: Union[int, torch.Tensor] = 0
        log_vars: Dict[str, torch.Tensor] = OrderedDict()
        for task, task_losses in per_task.items():
            loss, task_vars = self.task_loss(task, task_losses)
            total = total + loss
            log_vars.update(task_vars)
        return total, OrderedDict([('loss', total)] + list(log_vars.items()))

    def aux_loss(self) -> Optional[torch.Tensor]:
        """The backbone's weighted ``aux_loss()``, or ``None`` if it has
        none (a stock backbone)."""
        aux = getattr(self.backbone, 'aux_loss', None)
        if aux is None:
            return None
        return self.aux_loss_weight * aux()

    # ---------------------------------------------------------------- steps
    def train_step(
            self,
            data: Mapping[str, Any],
            optim_wrapper: OptimWrapper,
            step: Optional['SingleProcessStep'] = None
    ) -> Dict[str, torch.Tensor]:
        """One SIMT iteration: every task forward and backward in turn, then
        the router's auxiliary loss, then one optimizer iteration.

        One task's activations are freed (by its backward) before the next
        task runs, so the peak memory is that of the largest task, not of
        the sum. Gradients add up to those of the weighted total loss.

        Args:
            data (dict[str, dict]): One batch per task, as its dataloader
                gives it.
            optim_wrapper (SIMTOptimWrapper): A SIMT optimizer wrapper
                (``SIMTOptimWrapper``, ``SIMTAmpOptimWrapper``): its
                ``backward`` counts nothing, its ``end_iteration`` counts
                one iteration and steps when due, so loss scaling, gradient
                clipping and accumulation behave as in ``update_params``.
            step (SingleProcessStep, optional): Where the step runs; the
                distributed wrapper passes its rank's. Default: one
                process.

        Returns:
            dict: ``loss`` (weighted total of the tasks not skipped),
            ``<task>/<loss name>``, ``<task>/time`` (seconds) and
            ``<task>/skipped`` (1 if the task's loss or gradient was not
            finite, see :class:`NonFiniteGuard`), ``router/loss_aux`` and
            ``router/skipped`` when present.

        Raises:
            RuntimeError: A task was skipped ``nonfinite.max_consecutive``
                times in a row.
        """
        if not isinstance(data, Mapping) or not data:
            raise TypeError('GPPF.train_step expects a dict of batches keyed '
                            'by task (see SIMTTrainLoop)')
        tasks = [self._task(task) for task in data]
        _check_optim_wrapper(optim_wrapper)
        step = step or SingleProcessStep()
        losses: Dict[str, torch.Tensor] = OrderedDict()
        log_vars: Dict[str, torch.Tensor] = OrderedDict()
        for task in tasks:  # preprocess, stock loss, weighted backward
            with step.task_scope(task):
                losses[task], task_vars = self.task_backward(
                    task, data[task], optim_wrapper, step)
            log_vars.update(task_vars)
        step.exchange_routes()  # distributed: the routes of every rank
        losses['router'], aux_vars = self.aux_backward(optim_wrapper, step)
        log_vars.update(aux_vars)
        optim_wrapper.end_iteration()  # count; when due: sync, step, zero
        step.sync_buffers()  # distributed: norm statistics
        out = step.gather(losses, log_vars, optim_wrapper)
        self.nonfinite.record(out)
        return out

    def task_backward(
            self,
            task: str,
            data: Any,
            optim_wrapper: OptimWrapper,
            step: Optional['SingleProcessStep'] = None) -> LossAndLogs:
        """Preprocess, stock loss, weigh and backward one task's batch.

        Gradients accumulate in ``.grad``; the optimizer does not step. The
        loss is multiplied by ``step.loss_scale(task)`` for the backward
        only. If the loss, the norm statistics the forward updated or the
        gradient is not finite (on any rank that ran the task:
        ``step.agree``), the task changes nothing (:class:`NonFiniteGuard`).

        Returns:
            tuple: The task's weighted loss (detached; 0 if skipped) and its
            detached log variables: ``<task>/<name>``, ``<task>/time``,
            ``<task>/skipped``.
        """
        _check_optim_wrapper(optim_wrapper)
        step = step or SingleProcessStep()
        start = time.perf_counter()
        saved = self.nonfinite.save_buffers(self)
        with optim_wrapper.optim_context(self):
            batch = self.data_preprocessor(data, True, task=task)
            losses = self._stock(task, batch['inputs'], batch['data_samples'],
                                 'loss')
        del batch
        loss, log_vars = self.task_loss(task, losses)
        del losses
        kept = self.nonfinite.backward(
            task,
            loss,
            _backward(optim_wrapper, step.loss_scale(task)),
            list(self.parameters()),
            check_grads=not scales_loss(optim_wrapper),
            agree=step.agree,
            log_vars=log_vars,
            saved=saved)
        loss = loss.detach()
        if not kept:
            self.nonfinite.discard(self, task, saved)
            loss = torch.zeros_like(loss)
        del saved
        if self.sync_task_time and torch.cuda.is_available() and (
                self.data_preprocessor.device.type == 'cuda'):
            torch.cuda.synchronize()
        log_vars = OrderedDict((k, v.detach()) for k, v in log_vars.items())
        log_vars[f'{task}/time'] = torch.tensor(time.perf_counter() - start)
        log_vars[f'{task}/skipped'] = torch.tensor(float(not kept))
        return loss, log_vars

    def aux_backward(
            self,
            optim_wrapper: OptimWrapper,
            step: Optional['SingleProcessStep'] = None) -> LossAndLogs:
        """Backward the backbone's auxiliary loss of the tasks run since the
        last call, multiplied by ``step.loss_scale(None)`` for the backward
        only. A non-finite aux loss (or gradient) is skipped like a task's,
        as ``router`` (``step.agree`` over all ranks).

        Returns:
            tuple: The weighted aux loss (detached; 0 if skipped or without
            an aux loss) and ``router/loss_aux``, ``router/skipped`` (empty
            for a backbone without ``aux_loss``).
        """
        step = step or SingleProcessStep()
        aux = self.aux_loss()
        if aux is None:
            return torch.zeros(()), OrderedDict()
        kept = True
        if aux.requires_grad:
            kept = self.nonfinite.backward(
                'router',
                aux,
                _backward(optim_wrapper, step.loss_scale(None)),
                list(self.parameters()),
                check_grads=not scales_loss(optim_wrapper),
                agree=step.agree,
                log_vars={'router/loss_aux': aux})
        aux = aux.detach()
        return (aux if kept else torch.zeros_like(aux)), OrderedDict([
            ('router/loss_aux', aux),
            ('router/skipped', torch.tensor(float(not kept))),
        ])

    def val_step(self, data: Any, task: Optional[str] = None) -> list:
        """Preprocess (``training=False``) and predict one task's batch; the
        task defaults to :func:`current_task` (what :class:`SIMTValLoop`
        sets), so model wrappers that call ``module.val_step(data)`` work."""
        task = self._task(task)
        data = self.data_preprocessor(data, False, task=task)
        return self._stock(task, data['inputs'], data.get('data_samples'),
                           'predict')

    def test_step(self, data: Any, task: Optional[str] = None) -> list:
        """Same as :meth:`val_step`."""
        return self.val_step(data, task)


class SingleProcessStep:
    """Where a SIMT step runs: here, one process (the default of
    :meth:`GPPF.train_step`).

    :meth:`GPPF.train_step` asks it, in this order: the scope of each
    task's forward and backward, the factor of each loss and the agreement
    on its finiteness, the exchange before the router's loss, the buffer
    job after the optimizer iteration, the log variables.
    :class:`SIMTDistributedWrapper` passes a subclass that answers for its
    rank.
    """

    def task_scope(self, task: str) -> ContextManager:
        """Context of ``task``'s forward and backward."""
        return nullcontext()

    def loss_scale(self, task: Optional[str]) -> float:
        """Factor of a loss for its backward (``None``: the router's)."""
        return 1.0

    def agree(self, flags: torch.Tensor) -> torch.Tensor:
        """The 0/1 finite flags of one loss, agreed by every process that
        computed it."""
        return flags

    def exchange_routes(self) -> None:
        """Before the router's loss: learn the routes of every process."""

    def sync_buffers(self) -> None:
        """After the optimizer iteration: make buffers agree."""

    def gather(self, losses: Mapping[str, torch.Tensor],
               log_vars: Mapping[str, torch.Tensor],
               optim_wrapper: OptimWrapper) -> Dict[str, torch.Tensor]:
        """The step's log variables: ``loss`` (the sum of ``losses``, each
        task's weighted loss and the router's) then ``log_vars``."""
        total = sum(losses.values())
        return OrderedDict([('loss', total)] + list(log_vars.items()))


def _check_optim_wrapper(optim_wrapper: Any) -> None:
    if not callable(getattr(optim_wrapper, 'end_iteration', None)):
        raise TypeError(
            'GPPF.train_step runs one backward per task and counts one '
            'iteration: it needs a SIMT optimizer wrapper, e.g. '
            "optim_wrapper=dict(type='SIMTOptimWrapper', ...) or "
            "'SIMTAmpOptimWrapper' (SIMTTrainLoop turns OptimWrapper and "
            'AmpOptimWrapper configs into them; in code, build '
            'projects.gppf.engine.SIMTOptimWrapper); got '
            f'{type(optim_wrapper).__name__}. Use paramwise_cfg for '
            'per-module learning rates')


def _backward(optim_wrapper: OptimWrapper, factor: float):
    """Backward of one loss of a SIMT iteration: ``factor`` (the step's
    loss scale), then the optimizer wrapper's accumulation scaling, as in
    ``update_params``; the SIMT wrapper's ``backward`` counts nothing."""

    def run(loss: torch.Tensor) -> None:
        optim_wrapper.backward(optim_wrapper.scale_loss(loss * factor))

    return run


def _loss_weights(weights: Optional[Mapping[str, float]],
                  names: List[str]) -> Dict[str, float]:
    if weights is None:
        return {name: 1.0 for name in names}
    check_task_sets({'model.tasks': names, 'model.loss_weights': weights})
    out = {}
    for name in names:
        value = float(weights[name])
        if not value >= 0:
            raise ValueError(f'model.loss_weights[{name!r}] must be >= 0, '
                             f'got {weights[name]!r}')
        out[name] = value
    return out


def _preprocessor_cfg(cfg: Optional[Union[dict, nn.Module]],
                      task_cfgs: Mapping[str, ConfigDict]) -> Any:
    """The multi-task preprocessor config, completed with the stock
    ``data_preprocessor`` entries of the task configs."""
    if isinstance(cfg, nn.Module):
        return cfg
    cfg = ConfigDict(
        copy.deepcopy(dict(cfg)) if cfg else dict(
            type='MultiTaskDataPreprocessor'))
    stock = dict(cfg.get('preprocessors') or {})
    for name, task_cfg in task_cfgs.items():
        own = task_cfg.get('data_preprocessor')
        if name not in stock and own is not None:
            stock[name] = with_scope(
                own,
                f'model.tasks[{name!r}].data_preprocessor',
                default=task_cfg['_scope_'])
    cfg['preprocessors'] = stock
    return cfg


def _backbone_cfg(cfg: Any, names: List[str]) -> Any:
    """Pass the task names to a backbone that routes tasks (``tasks=``).

    They are passed sorted: mmengine's ``Config.dump`` (the config saved in
    the work dir and the checkpoint) sorts dict keys, so the order of
    ``tasks`` in a config is not stable, and a router indexes tasks by
    position.
    """
    if not isinstance(cfg, Mapping) or 'tasks' in cfg:
        return cfg
    cls = cfg.get('type')
    if isinstance(cls, str):
        cls = MODELS.get(cls)
    if cls is not None and 'tasks' in inspect.signature(cls).parameters:
        cfg = ConfigDict(copy.deepcopy(dict(cfg)))
        cfg['tasks'] = sorted(names)
    return cfg
