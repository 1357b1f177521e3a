"""Process-group set-up for ``torchrun`` launches on CPU (gloo).

mmengine's ``init_dist('pytorch', ...)`` always calls
``torch.cuda.set_device(local_rank)``, which fails on a machine without a
GPU ("Found no NVIDIA driver"). :func:`init_dist_env` initialises the
default process group itself, with the gloo backend, when the job runs under
a launcher and CUDA is not available (or the config asks for gloo);
``Runner.setup_env`` then skips ``init_dist`` because the group exists.
With CUDA and nccl it does nothing and mmengine initialises as usual.

On CPU it also makes ``Runner.wrap_model`` build a DDP-type wrapper with
``device_ids=None``: mmengine passes ``device_ids=[LOCAL_RANK]``, which
torch's ``DistributedDataParallel`` refuses for a module on the CPU.
"""
import datetime
import os

import torch
import torch.distributed as torch_dist
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log
from mmengine.registry import MODEL_WRAPPERS
from torch.nn.parallel import DistributedDataParallel

__all__ = ['init_dist_env', 'cpu_model_wrapper_cfg']

DEFAULT_TIMEOUT_S = 1800
_ENV_VARS = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def init_dist_env(cfg: Config) -> None:
    """Initialise a gloo default process group for ``cfg`` if mmengine can't.

    Acts only when ``cfg.launcher == 'pytorch'`` (``torchrun``), no group is
    initialised yet, and CUDA is unavailable or
    ``cfg.env_cfg.dist_cfg.backend`` is ``'gloo'``. Rank, world size and
    master address come from the ``torchrun`` environment; the timeout is
    ``cfg.env_cfg.dist_cfg.timeout`` in seconds (default 1800). Sets
    ``cfg.env_cfg.dist_cfg.backend = 'gloo'`` and, on CPU, ``device_ids=None``
    for a DDP-type ``cfg.model_wrapper_cfg`` (:func:`cpu_model_wrapper_cfg`).
    Other launchers (slurm, mpi) are left to mmengine.
    """
    launcher = cfg.get('launcher', 'none')
    if launcher != 'pytorch':
        return
    if torch_dist.is_available() and torch_dist.is_initialized():
        return
    dist_cfg = (cfg.get('env_cfg') or {}).get('dist_cfg') or {}
    backend = dist_cfg.get('backend', 'nccl')
    cuda = torch.cuda.is_available()
    if cuda and backend != 'gloo':
        return  # mmengine's init_dist sets the device and initialises

    missing = [k for k in _ENV_VARS if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"launcher 'pytorch' needs the environment variables "
            f'{", ".join(missing)} (set by torchrun / '
            'tools/dist_train.sh)')
    timeout_s = dist_cfg.get('timeout', None)
    if timeout_s is None:
        timeout_s = DEFAULT_TIMEOUT_S
    try:
        timeout = datetime.timedelta(seconds=timeout_s)
    except TypeError as e:
        raise TypeError(
            'env_cfg.dist_cfg.timeout must be a number of seconds, got '
            f'{type(timeout_s).__name__}') from e
    rank = int(os.environ['RANK'])
    world_size = int(os.environ['WORLD_SIZE'])
    if cuda:  # gloo asked for on a GPU machine: keep mmengine's device
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    torch_dist.init_process_group(
        backend='gloo', rank=rank, world_size=world_size, timeout=timeout)
    if cfg.get('env_cfg') is None:
        cfg.env_cfg = ConfigDict()
    if cfg.env_cfg.get('dist_cfg') is None:
        cfg.env_cfg.dist_cfg = ConfigDict()
    cfg.env_cfg.dist_cfg.backend = 'gloo'
    if not cuda:
        cpu_model_wrapper_cfg(cfg)
        print_log(
            f'CUDA is not available: initialised the process group with '
            f'the gloo backend on CPU (configured backend {backend!r}, '
            f'world size {world_size}, timeout {timeout_s} s)',
            logger='current')


def cpu_model_wrapper_cfg(cfg: Config) -> None:
    """Make ``Runner.wrap_model`` build its DDP-type wrapper for the CPU.

    Without ``cfg.model_wrapper_cfg`` this writes mmengine's default
    (``MMDistributedDataParallel``, ``broadcast_buffers=False``,
    ``find_unused_parameters`` from the config) with ``device_ids=None``;
    a given wrapper that subclasses ``DistributedDataParallel`` gets
    ``device_ids=None`` unless it sets them. Other wrappers are unchanged.
    """
    wrapper = cfg.get('model_wrapper_cfg', None)
    if wrapper is None:
        cfg.model_wrapper_cfg = ConfigDict(
            type='MMDistributedDataParallel',
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False),
            device_ids=None)
        return
    wrapper_type = wrapper.get('type', 'MMDistributedDataParallel')
    if isinstance(wrapper_type, str):
        wrapper_type = MODEL_WRAPPERS.get(wrapper_type)
    if (isinstance(wrapper_type, type)
            and issubclass(wrapper_type, DistributedDataParallel)
            and 'device_ids' not in wrapper):
        wrapper.device_ids = None
