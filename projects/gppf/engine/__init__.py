from .simt_loops import (SIMTTestLoop, SIMTTrainLoop, SIMTValLoop,
                         check_simt_cfg, metrics_table)
from .task_loaders import TaskLoaders
from .task_router_hook import TaskRouterHook

__all__ = [
    'SIMTTrainLoop', 'SIMTValLoop', 'SIMTTestLoop', 'TaskLoaders',
    'check_simt_cfg', 'metrics_table', 'TaskRouterHook'
]
