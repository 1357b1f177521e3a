from .checkpoint import allow_mmengine_globals, mmengine_safe_globals
from .dist_env import init_dist_env

__all__ = ['allow_mmengine_globals', 'mmengine_safe_globals', 'init_dist_env']
