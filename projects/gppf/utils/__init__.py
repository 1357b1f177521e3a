from .checkpoint import allow_mmengine_globals, mmengine_safe_globals
from .dist_env import init_dist_env
from .random_state import (get_random_state, isolated_random_state,
                           sample_seed, seeded_random_state, set_random_state)

__all__ = [
    'allow_mmengine_globals', 'mmengine_safe_globals', 'init_dist_env',
    'get_random_state', 'set_random_state', 'isolated_random_state',
    'seeded_random_state', 'sample_seed'
]
