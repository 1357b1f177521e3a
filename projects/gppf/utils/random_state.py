"""The random streams a training process consumes: capture, restore,
isolate, and seed one sample at a time.

A run resumes exactly when every random stream it draws from continues
where it stopped. The process-wide streams (Python ``random``, numpy's
global generator, torch's CPU generator and, where initialised, the CUDA
generators) are captured into checkpoints by :class:`SafeCheckpointHook`
and restored on resume. The data pipelines do not draw from them: each
training sample is loaded inside :func:`seeded_random_state` with a seed
that depends only on its place in its task's batch stream
(:func:`sample_seed`), so augmentations do not depend on the number of
dataloader workers, on which worker loads a sample, or on where a run was
resumed.
"""
import hashlib
import random
import struct
from contextlib import contextmanager
from typing import Any, Dict, Iterator

import numpy as np
import torch

__all__ = [
    'get_random_state', 'set_random_state', 'isolated_random_state',
    'seeded_random_state', 'sample_seed'
]


def get_random_state(cuda: bool = True) -> Dict[str, Any]:
    """The state of every process-wide random stream.

    Args:
        cuda (bool): Include the CUDA generators (if initialised).

    Returns:
        dict: ``python``, ``numpy`` and ``torch`` (and ``cuda``, a list per
        device, once CUDA is initialised), in types that
        ``torch.load(weights_only=True)`` reads back: tuples of ints,
        floats and tensors.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(
        python=random.getstate(),
        numpy=(kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
               int(has_gauss), float(gauss)),
        torch=torch.get_rng_state())
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: Dict[str, Any]) -> None:
    """Restore the streams captured by :func:`get_random_state`.

    Raises:
        KeyError: ``state`` lacks one of the CPU streams.
    """
    missing = [k for k in ('python', 'numpy', 'torch') if k not in state]
    if missing:
        raise KeyError(f'random state without {missing}')
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state['numpy']
    keys = torch.as_tensor(keys).cpu().numpy().astype(np.uint32)
    np.random.set_state((kind, keys, int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(torch.as_tensor(state['torch']).cpu())
    if state.get('cuda') is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


@contextmanager
def isolated_random_state() -> Iterator[None]:
    """Run a block without changing the process-wide random streams (an
    evaluation inside training leaves training's streams as they were)."""
    state = get_random_state()
    try:
        yield
    finally:
        set_random_state(state)


@contextmanager
def seeded_random_state(seed: int) -> Iterator[None]:
    """Seed Python ``random``, numpy and torch's CPU generator with
    ``seed`` for the block, then restore them as they were before it (the
    CUDA generators are not touched)."""
    state = get_random_state(cuda=False)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        set_random_state(state)


def sample_seed(*parts: Any) -> int:
    """A 32-bit seed from ``parts`` (e.g. run seed, task, rank, batch
    position, slot), the same in every process and Python session (unlike
    ``hash()``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return struct.unpack('<Q', digest)[0] % 2**32
