"""Module extra state as a tensor.

``get_extra_state`` may return any object, but mmengine's runner broadcasts
every ``state_dict()`` value as a tensor when distributed
(``Runner._init_model_weights``), and a tensor is what weights-only
checkpoint loading reads without an allow-list. So the lego backbone and the
router pack their small Python state (layout, route flags, call counts) as
UTF-8 JSON in a ``uint8`` tensor.
"""
import json
from typing import Any, Dict, Union

import torch

__all__ = ['pack_state', 'unpack_state']


def pack_state(state: Dict[str, Any]) -> torch.Tensor:
    """``state`` (JSON-serialisable) as a ``uint8`` tensor."""
    data = json.dumps(state, sort_keys=True).encode('utf-8')
    return torch.tensor(list(data), dtype=torch.uint8)


def unpack_state(value: Union[torch.Tensor, Dict[str, Any]]) -> Dict[str, Any]:
    """Inverse of :func:`pack_state`; a dict (checkpoints written before
    the state was packed) is returned as is."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise TypeError('extra state must be a uint8 tensor of JSON, got '
                        f'{type(value).__name__}')
    return json.loads(bytes(value.cpu().tolist()).decode('utf-8'))
