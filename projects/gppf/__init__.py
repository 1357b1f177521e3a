"""gppf: GPPF multi-task pre-training as an OpenMMLab plugin.

Importing ``projects.gppf`` (e.g. through ``custom_imports`` in a config)
registers its modules in mmengine's root registries, which the mmdet, mmseg
and mmpretrain registries all fall back to, and allow-lists the safe globals
that mmengine checkpoints need under ``torch.load(weights_only=True)``.
"""
from .datasets import *  # noqa: F401,F403
from .datasets import __all__ as _datasets_all
from .engine import *  # noqa: F401,F403
from .engine import __all__ as _engine_all
from .models import *  # noqa: F401,F403
from .models import __all__ as _models_all
from .utils import allow_mmengine_globals

allow_mmengine_globals()

__all__ = list(_models_all) + list(_datasets_all) + list(_engine_all)
