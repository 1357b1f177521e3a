"""One stock data preprocessor per task, behind one ``data_preprocessor``."""
from typing import Any, Dict, List, Mapping, Optional, Union

import torch.nn as nn
from mmengine.model import BaseDataPreprocessor
from mmengine.registry import MODELS

from .task_config import check_task_name, with_scope
from .task_context import current_task

__all__ = ['MultiTaskDataPreprocessor']


@MODELS.register_module()
class MultiTaskDataPreprocessor(BaseDataPreprocessor):
    """Dispatch each task's batch to that task's stock data preprocessor.

    Each entry is built in its own library (a type prefix becomes
    ``_scope_``), e.g.::

        data_preprocessor=dict(
            type='MultiTaskDataPreprocessor',
            preprocessors=dict(
                coco_det=dict(type='mmdet.DetDataPreprocessor',
                              bgr_to_rgb=True, pad_size_divisor=32, ...),
                ade20k_seg=dict(type='mmseg.SegDataPreProcessor',
                                bgr_to_rgb=True, size=(512, 512), ...),
                in1k_cls=dict(type='mmpretrain.ClsDataPreprocessor',
                              to_rgb=True, ...)))

    The stock preprocessors keep their own conventions (mmpretrain spells its
    colour flag ``to_rgb``, mmdet and mmseg ``bgr_to_rgb``; mmseg's requires
    images of one size in a batch outside training). They move to the
    model's device with the model.

    Args:
        preprocessors (dict[str, dict | nn.Module]): Stock preprocessor per
            task name.
        non_blocking (bool): As in :class:`BaseDataPreprocessor`.
    """

    def __init__(self,
                 preprocessors: Mapping[str, Union[dict, nn.Module]],
                 non_blocking: bool = False) -> None:
        super().__init__(non_blocking=non_blocking)
        if not isinstance(preprocessors, Mapping):
            raise TypeError('preprocessors must be a dict keyed by task, got '
                            f'{type(preprocessors).__name__}')
        self.preprocessors = nn.ModuleDict()
        for task, cfg in preprocessors.items():
            check_task_name(task)
            if not isinstance(cfg, nn.Module):
                cfg = MODELS.build(
                    with_scope(cfg, f'data_preprocessor.preprocessors'
                               f'[{task!r}]'))
            self.preprocessors[task] = cfg

    @property
    def tasks(self) -> List[str]:
        """Task names, in order."""
        return list(self.preprocessors.keys())

    def forward(self,
                data: Any,
                training: bool = False,
                task: Optional[str] = None) -> Dict[str, Any]:
        """Run ``task``'s stock preprocessor on its batch.

        Args:
            data (dict): One task's batch from its dataloader
                (``inputs``: list of (C, H, W) uint8 tensors,
                ``data_samples``: list of the library's data samples).
            training (bool): Training-time behaviour (padding, batch
                augments). Default: False.
            task (str, optional): The task; defaults to
                :func:`current_task`.

        Returns:
            dict: ``inputs`` (B, C, H', W') float tensor on the model's
            device and ``data_samples``, as the stock preprocessor returns.
        """
        task = task or current_task()
        if task is None:
            if len(self.preprocessors) != 1:
                raise RuntimeError(
                    'MultiTaskDataPreprocessor needs a task: pass task= or '
                    f'run inside use_task(name); tasks: {self.tasks}')
            task = self.tasks[0]
        if task not in self.preprocessors:
            raise KeyError(f'no data preprocessor for task {task!r}; '
                           f'tasks: {self.tasks}')
        return self.preprocessors[task](data, training)

    def _sync_device(self) -> None:
        for preprocessor in self.preprocessors.values():
            if isinstance(preprocessor, BaseDataPreprocessor):
                preprocessor._device = self._device

    def to(self, *args, **kwargs) -> nn.Module:
        """Move to a device, the stock preprocessors included."""
        out = super().to(*args, **kwargs)
        self._sync_device()
        return out

    def cuda(self, *args, **kwargs) -> nn.Module:
        """Move to the current CUDA device, stock preprocessors included."""
        out = super().cuda(*args, **kwargs)
        self._sync_device()
        return out

    def cpu(self, *args, **kwargs) -> nn.Module:
        """Move to the CPU, the stock preprocessors included."""
        out = super().cpu(*args, **kwargs)
        self._sync_device()
        return out
