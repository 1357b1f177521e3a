"""Loading mmengine checkpoints under ``torch.load(weights_only=True)``.

torch >= 2.6 unpickles checkpoints with ``weights_only=True`` by default.
mmengine 0.10.7 writes numpy arrays and scalars into ``meta`` and
``message_hub`` (its :class:`HistoryBuffer` logs, whose statistics methods
pickle as ``getattr(HistoryBuffer, 'mean')``), so ``resume=True`` and
``load_checkpoint`` of its own checkpoints fail with "Unsupported global".
:func:`allow_mmengine_globals` allow-lists exactly the globals those
checkpoints contain (found with ``torch.serialization.
get_unsafe_globals_in_checkpoint`` on a real Runner checkpoint). ``getattr``
is *not* allowed as such: the name is bound to :func:`history_buffer_getattr`,
which resolves only ``HistoryBuffer``'s own statistics methods
(:data:`HISTORY_STATISTICS`). Anything else (a function, an arbitrary class,
another attribute) is still refused, so a checkpoint cannot run code. It
runs once on ``import projects.gppf``.
"""
import pickle
from typing import Any, List

import numpy as np
import torch

__all__ = [
    'mmengine_safe_globals', 'history_buffer_getattr',
    'allow_mmengine_globals', 'HISTORY_STATISTICS'
]

#: ``HistoryBuffer``'s statistics methods (the ones defined on the class;
#: a statistic added with ``register_statistics`` is no class attribute).
HISTORY_STATISTICS = ('min', 'max', 'current', 'mean')


def history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` restricted to ``HistoryBuffer``'s statistics methods."""
    from mmengine.logging.history_buffer import HistoryBuffer

    if obj is HistoryBuffer and name in HISTORY_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'refused getattr({obj!r}, {name!r}) in a weights-only checkpoint')


def mmengine_safe_globals() -> List[object]:
    """The classes and reconstructors mmengine 0.10.7 checkpoints hold."""
    from mmengine.logging.history_buffer import HistoryBuffer
    core = getattr(np, '_core', None) or np.core
    dtypes = [
        type(np.dtype(t))
        for t in (np.float64, np.float32, np.float16, np.int64, np.int32,
                  np.int16, np.int8, np.uint8, np.bool_)
    ]
    return [
        core.multiarray._reconstruct,
        core.multiarray.scalar,
        np.ndarray,
        np.dtype,
        *dtypes,
        HistoryBuffer,
    ]


def allow_mmengine_globals() -> None:
    """Add :func:`mmengine_safe_globals` to torch's weights-only allow-list."""
    torch.serialization.add_safe_globals([
        *mmengine_safe_globals(), (history_buffer_getattr, 'builtins.getattr')
    ])
