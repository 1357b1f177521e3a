from .route_search_hook import RouteSearchHook
from .safe_checkpoint_hook import SafeCheckpointHook
from .simt_loops import (SIMTTestLoop, SIMTValLoop, check_simt_cfg,
                         metrics_table)
from .simt_optim_wrapper import (SIMTAmpOptimWrapper, SIMTOptimWrapper,
                                 SIMTOptimWrapperMixin, use_simt_optim_wrapper)
from .simt_train_loop import SIMTTrainLoop
from .task_loaders import TaskLoaders
from .task_router_hook import TaskRouterHook

__all__ = [
    'SIMTTrainLoop', 'SIMTValLoop', 'SIMTTestLoop', 'TaskLoaders',
    'check_simt_cfg', 'metrics_table', 'TaskRouterHook', 'RouteSearchHook',
    'SafeCheckpointHook', 'SIMTOptimWrapper', 'SIMTAmpOptimWrapper',
    'SIMTOptimWrapperMixin', 'use_simt_optim_wrapper'
]
