"""One stock data preprocessor per task, behind one ``data_preprocessor``."""
from typing import Any, Dict, List, Mapping, Optional, Union

import torch.nn as nn
from mmengine.model import BaseDataPreprocessor
from mmengine.registry import MODELS

from .task_config import check_task_name, with_scope
from .task_context import resolve_task

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
    model's device with the model (``BaseModel.to``/``cuda``/``cpu`` set the
    device of every ``BaseDataPreprocessor`` inside the model).

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
                where = f'data_preprocessor.preprocessors[{task!r}]'
                cfg = MODELS.build(with_scope(cfg, where))
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
            task (str, optional): The task; else :func:`current_task`,
                else the only task (:func:`resolve_task`).

        Returns:
            dict: ``inputs`` (B, C, H', W') float tensor on the model's
            device and ``data_samples``, as the stock preprocessor returns.
        """
        task = resolve_task(task, self.tasks, type(self).__name__)
        return self.preprocessors[task](data, training)
