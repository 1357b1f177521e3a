"""Lego units and their routing: the layers, the task router, per-task norm
statistics, the routing side of a lego backbone, and the conversions
between lego and dense checkpoints."""
from .backbone_mixin import LegoBackboneMixin
from .convert import (extract_task_state_dict, lego_modules,
                      load_dense_or_lego, read_state_dict)
from .layers import LegoBatchNorm, LegoConv2d
from .linear_units import LegoLinear
from .packed_state import pack_state, unpack_state
from .router import Route, TaskRouter
from .task_norm import TaskBatchNorm2d, TaskSyncBatchNorm
from .task_remap import remap_tasks
from .vit_convert import (extract_vit_task_state_dict, load_vit_dense_or_lego,
                          mmpretrain_to_mmseg, mmseg_to_mmpretrain,
                          read_vit_state_dict, timm_to_mmpretrain)

__all__ = [
    'LegoConv2d', 'LegoBatchNorm', 'TaskRouter', 'Route', 'TaskBatchNorm2d',
    'TaskSyncBatchNorm', 'extract_task_state_dict', 'lego_modules',
    'load_dense_or_lego', 'read_state_dict', 'pack_state', 'unpack_state',
    'remap_tasks', 'LegoLinear', 'extract_vit_task_state_dict',
    'load_vit_dense_or_lego', 'read_vit_state_dict', 'timm_to_mmpretrain',
    'mmseg_to_mmpretrain', 'mmpretrain_to_mmseg', 'LegoBackboneMixin'
]
