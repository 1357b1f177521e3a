"""GPPF: one shared backbone and, per task, a stock OpenMMLab model.

Each task is the model its own library builds from its usual config (an
mmdet detector, an mmseg segmentor, an mmpretrain classifier), except that
its ``backbone`` attribute is the one shared backbone. Nothing of the three
libraries is re-implemented: ``loss()`` and ``predict()`` are the stock ones,
run inside :func:`use_task` so that a lego backbone picks the task's route.
"""
import copy
import inspect
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from mmengine.config import ConfigDict
from mmengine.logging import print_log
from mmengine.model import BaseModel
from mmengine.optim import OptimWrapper
from mmengine.registry import MODELS
from mmengine.utils import is_list_of

from .nonfinite import NonFiniteGuard, scales_loss
from .task_config import check_task_name, check_task_sets, with_scope
from .task_context import current_task, use_task

__all__ = ['GPPF', 'SharedBackboneSlot']

ForwardResults = Union[Dict[str, torch.Tensor], list, tuple, torch.Tensor]


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
        self.tasks = nn.ModuleDict()
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
        modules = model._modules
        if not isinstance(modules.get('backbone'), SharedBackboneSlot):
            raise TypeError(f'model.tasks[{name!r}] ({type(model).__name__}) '
                            'does not keep its backbone as `.backbone`')
        # Plain references (not sub-modules): the shared backbone and the
        # task's stock preprocessor are registered once, in GPPF.
        del modules['backbone']
        object.__setattr__(model, 'backbone', self.backbone)
        stock = getattr(self.data_preprocessor, 'preprocessors', {})
        if name in stock and 'data_preprocessor' in modules:
            del modules['data_preprocessor']
            object.__setattr__(model, 'data_preprocessor', stock[name])
        return model

    @property
    def task_names(self) -> List[str]:
        """Task names, in order."""
        return list(self.tasks.keys())

    def _task(self, task: Optional[str]) -> str:
        task = task or current_task()
        if task is None:
            if len(self.tasks) != 1:
                raise RuntimeError('GPPF needs a task: pass task= or run '
                                   f'inside use_task(name); tasks: '
                                   f'{self.task_names}')
            task = self.task_names[0]
        if task not in self.tasks:
            raise KeyError(f'unknown task {task!r}; GPPF tasks: '
                           f'{self.task_names}')
        return task

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
            task (str, optional): Defaults to :func:`current_task`.

        Returns:
            ``'loss'``: dict of losses keyed ``<task>/<loss name>``;
            ``'predict'``: the stock model's list of data samples;
            ``'tensor'``: the stock model's raw outputs.
        """
        task = self._task(task)
        with use_task(task):
            out = self.tasks[task](inputs, data_samples, mode=mode)
        if mode == 'loss':
            return OrderedDict((f'{task}/{k}', v) for k, v in out.items())
        return out

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

    def parse_losses(
        self,
        losses: Mapping[str,
                        Any]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """mmengine's loss parsing with per-task weights.

        Keys are ``<task>/<name>``. As in :meth:`BaseModel.parse_losses`,
        each value (tensor or list of tensors) is mean-reduced (and summed
        over the list) and the names containing ``'loss'`` are summed; each
        task's sum is multiplied by its weight.

        Args:
            losses (dict): Losses of one or several tasks.

        Returns:
            tuple: The weighted total (0-dim tensor) and the log variables:
            ``loss`` (the weighted total) then every ``<task>/<name>``
            (unweighted).
        """
        log_vars: Dict[str, torch.Tensor] = OrderedDict()
        total: Union[int, torch.Tensor] = 0
        for key, value in losses.items():
            task, _, name = key.partition('/')
            if not name or task not in self.tasks:
                raise KeyError(f'loss {key!r} is not keyed <task>/<name> '
                               f'with a task of {self.task_names}')
            if isinstance(value, torch.Tensor):
                value = value.mean()
            elif is_list_of(value, torch.Tensor):
                value = sum(v.mean() for v in value)
            else:
                raise TypeError(f'{key} is not a tensor or list of tensors')
            log_vars[key] = value
            if 'loss' in name:
                total = total + self.loss_weights[task] * value
        if not isinstance(total, torch.Tensor):
            raise ValueError(f'no loss found among {list(losses)}')
        log_vars = OrderedDict([('loss', total)] + list(log_vars.items()))
        return total, log_vars

    def aux_loss(self) -> Optional[torch.Tensor]:
        """The backbone's weighted ``aux_loss()``, or ``None`` if it has
        none (a stock backbone)."""
        aux = getattr(self.backbone, 'aux_loss', None)
        if aux is None:
            return None
        return self.aux_loss_weight * aux()

    # ---------------------------------------------------------------- steps
    def train_step(self, data: Mapping[str, Any],
                   optim_wrapper: OptimWrapper) -> Dict[str, torch.Tensor]:
        """One SIMT iteration: every task forward and backward in turn, then
        the router's auxiliary loss, then one optimizer step.

        One task's activations are freed (by its backward) before the next
        task runs, so the peak memory is that of the largest task, not of
        the sum. Gradients add up to those of the weighted total loss.

        Args:
            data (dict[str, dict]): One batch per task, as its dataloader
                gives it.
            optim_wrapper (OptimWrapper): ``OptimWrapper`` or a subclass
                (``AmpOptimWrapper``); loss scaling, gradient clipping and
                accumulation behave as in ``update_params``: one call of this
                method counts as one iteration.

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
        log_vars: Dict[str, torch.Tensor] = OrderedDict()
        total = 0.0
        for task in data:
            task_vars = self.task_backward(task, data[task], optim_wrapper)
            total = total + task_vars.pop('loss')
            log_vars.update(task_vars)
        aux_vars = self.aux_backward(optim_wrapper)
        total = total + aux_vars.pop('loss', 0.0)
        log_vars.update(aux_vars)
        self.finish_step(optim_wrapper)
        out = OrderedDict([('loss', total)] + list(log_vars.items()))
        self.nonfinite.record(out)
        return out

    def task_backward(
        self,
        task: str,
        data: Any,
        optim_wrapper: OptimWrapper,
        grad_scale: float = 1.0,
        agree: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    ) -> Dict[str, torch.Tensor]:
        """Preprocess, forward, weigh and backward one task's batch.

        Gradients accumulate in ``.grad``; the optimizer does not step (see
        :meth:`finish_step`). ``grad_scale`` multiplies the loss before the
        backward only (a distributed wrapper passes ``1 / ranks running the
        task``). If the loss, the norm statistics the forward updated or
        the gradient is not finite, the task changes nothing
        (:class:`NonFiniteGuard`); ``agree`` reduces the
        0/1 flags over the ranks running the task (a distributed wrapper
        passes an all-reduce ``MIN``). Returns the task's detached, unscaled
        log variables: ``loss`` (its weighted loss, 0 if skipped),
        ``<task>/<name>``, ``<task>/time``, ``<task>/skipped``.
        """
        task = self._task(task)
        _check_optim_wrapper(optim_wrapper)
        start = time.perf_counter()
        saved = self.nonfinite.save_buffers(self)
        with optim_wrapper.optim_context(self):
            batch = self.data_preprocessor(data, True, task=task)
            losses = self(**batch, mode='loss', task=task)
        del batch
        loss, log_vars = self.parse_losses(losses)
        del losses
        kept = self.nonfinite.backward(
            task,
            loss,
            lambda x: _backward_within_step(optim_wrapper, x * grad_scale),
            list(self.parameters()),
            check_grads=not scales_loss(optim_wrapper),
            agree=agree,
            log_vars=log_vars,
            saved=saved)
        del loss
        if not kept:
            self.nonfinite.discard(self, task, saved)
            log_vars['loss'] = torch.zeros_like(log_vars['loss'])
        del saved
        if self.sync_task_time and torch.cuda.is_available() and (
                self.data_preprocessor.device.type == 'cuda'):
            torch.cuda.synchronize()
        out = OrderedDict((k, v.detach()) for k, v in log_vars.items())
        out[f'{task}/time'] = torch.tensor(time.perf_counter() - start)
        out[f'{task}/skipped'] = torch.tensor(float(not kept))
        return out

    def aux_backward(
        self,
        optim_wrapper: OptimWrapper,
        grad_scale: float = 1.0,
        agree: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    ) -> Dict[str, torch.Tensor]:
        """Backward the backbone's auxiliary loss of the tasks run since the
        last call (no-op for a backbone without ``aux_loss``); the loss is
        multiplied by ``grad_scale`` for the backward only. A non-finite
        aux loss (or gradient) is skipped like a task's, as ``router``
        (``agree`` as in :meth:`task_backward`, over all ranks)."""
        aux = self.aux_loss()
        if aux is None:
            return {}
        kept = True
        if aux.requires_grad:
            kept = self.nonfinite.backward(
                'router',
                aux,
                lambda x: _backward_within_step(optim_wrapper, x * grad_scale),
                list(self.parameters()),
                check_grads=not scales_loss(optim_wrapper),
                agree=agree,
                log_vars={'router/loss_aux': aux})
        aux = aux.detach()
        return OrderedDict(
            loss=aux if kept else torch.zeros_like(aux),
            **{
                'router/loss_aux': aux,
                'router/skipped': torch.tensor(float(not kept))
            })

    def finish_step(self,
                    optim_wrapper: OptimWrapper,
                    before_step: Optional[Callable[[], None]] = None) -> None:
        """Count the iteration and step/zero the optimizer when
        ``update_params`` would (every ``accumulative_counts`` iterations).

        ``before_step`` runs right before the step (a distributed wrapper
        synchronises the gradients there, before clipping and unscaling).
        """
        optim_wrapper._inner_count += 1
        if optim_wrapper.should_update():
            if before_step is not None:
                before_step()
            optim_wrapper.step()
            optim_wrapper.zero_grad()

    def val_step(self, data: Any, task: Optional[str] = None) -> list:
        """Preprocess (``training=False``) and predict one task's batch; the
        task defaults to :func:`current_task` (what :class:`SIMTValLoop`
        sets), so model wrappers that call ``module.val_step(data)`` work."""
        task = self._task(task)
        data = self.data_preprocessor(data, False, task=task)
        return self(**data, mode='predict', task=task)

    def test_step(self, data: Any, task: Optional[str] = None) -> list:
        """Same as :meth:`val_step`."""
        return self.val_step(data, task)


def _check_optim_wrapper(optim_wrapper: Any) -> None:
    if not isinstance(optim_wrapper, OptimWrapper):
        raise TypeError('SIMT needs one OptimWrapper (or AmpOptimWrapper); '
                        f'got {type(optim_wrapper).__name__}. Use '
                        'paramwise_cfg for per-module learning rates')


def _backward_within_step(optim_wrapper: OptimWrapper,
                          loss: torch.Tensor) -> None:
    """``update_params``'s scaling and backward, without counting an update.

    ``OptimWrapper.backward`` counts every call in ``_inner_count`` (its
    documented contract for subclasses), which drives loss scaling for
    gradient accumulation and ``should_update``. A SIMT iteration calls it
    once per task, so the count is restored here and advanced once in
    :meth:`GPPF.finish_step`.
    """
    optim_wrapper.backward(optim_wrapper.scale_loss(loss))
    optim_wrapper._inner_count -= 1


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
