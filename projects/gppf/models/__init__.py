from .backbones import LegoResNet, LegoViT
from .checked_pretrained import CheckedPretrainedInit, CheckpointMismatchError
from .data_preprocessor import MultiTaskDataPreprocessor
from .gppf import GPPF, SharedBackboneSlot
from .layers import LN2d
from .lego import (Route, TaskRouter, extract_task_state_dict,
                   extract_vit_task_state_dict, load_dense_or_lego, pack_state,
                   read_state_dict, unpack_state)
from .necks import SimpleFPN
from .simt_wrapper import SIMTDistributedWrapper
from .task_config import check_task_sets, scope_of, with_scope
from .task_context import current_task, use_task

__all__ = [
    'LegoResNet', 'TaskRouter', 'Route', 'use_task', 'current_task',
    'extract_task_state_dict', 'load_dense_or_lego', 'read_state_dict', 'GPPF',
    'SharedBackboneSlot', 'MultiTaskDataPreprocessor', 'check_task_sets',
    'scope_of', 'with_scope', 'SIMTDistributedWrapper', 'pack_state',
    'unpack_state', 'LegoViT', 'extract_vit_task_state_dict', 'LN2d',
    'SimpleFPN', 'CheckedPretrainedInit', 'CheckpointMismatchError'
]
