from .checkpoint import allow_mmengine_globals, mmengine_safe_globals

__all__ = ['allow_mmengine_globals', 'mmengine_safe_globals']
