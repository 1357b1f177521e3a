"""Reading a backbone's state dict out of a checkpoint, and saying which
keys a load missed or left unused (shared by the ResNet and ViT
conversions)."""
from typing import Callable, Dict, List, Optional

import torch
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = ['read_backbone_state', 'log_key_mismatch']

StateDict = Dict[str, torch.Tensor]


def read_backbone_state(
        checkpoint: str, prefix: Optional[str],
        default_prefix: Callable[[StateDict], str]) -> StateDict:
    """A checkpoint's state dict (``state_dict``, ``model`` or the top
    level), ``module.`` stripped; only the keys under ``prefix`` (or, when
    it is ``None``, under ``default_prefix(state)``), with it stripped.

    Raises:
        KeyError: no key has the prefix.
    """
    ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    state = ckpt.get('state_dict', ckpt.get('model', ckpt))
    state = {
        k[7:] if k.startswith('module.') else k: v
        for k, v in state.items()
    }
    if prefix is None:
        prefix = default_prefix(state)
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        state = {
            k[len(prefix):]: v
            for k, v in state.items() if k.startswith(prefix)
        }
        if not state:
            raise KeyError(f'{checkpoint} has no keys with prefix {prefix!r}')
    return state


def log_key_mismatch(owner: str, missing: List[str],
                     unexpected: List[str]) -> None:
    """Log the keys a load of ``owner`` (a class name) missed (a warning)
    and left unused (info)."""
    if missing:
        print_log(
            f'{owner}: missing keys in checkpoint: {missing}',
            logger='current',
            level=30)
    if unexpected:
        print_log(
            f'{owner}: unused keys in checkpoint: {unexpected}',
            logger='current',
            level=20)
