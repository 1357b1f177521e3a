"""mmengine's ``CheckpointHook`` with what the checkpoints of a long run
must guarantee: written atomically, never of a diverged model, and with the
random streams that make a resumed run continue exactly."""
import logging
import os
import os.path as osp
from typing import Any, List, Optional

import torch
from mmengine.dist import all_gather_object, get_rank, is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..utils.random_state import get_random_state, set_random_state

__all__ = ['SafeCheckpointHook', 'first_non_finite', 'atomic_write']


def first_non_finite(module: torch.nn.Module) -> Optional[str]:
    """Name of the first floating-point parameter or buffer of ``module``
    holding a NaN or an infinity, or ``None``."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(
                torch.isfinite(tensor).all()):
            return name
    return None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old
    file or the new one, never part of it (temporary file in the same
    directory, flushed to disk, renamed over ``path``)."""
    tmp = osp.join(osp.dirname(path), f'.{osp.basename(path)}.tmp')
    with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """``CheckpointHook`` whose checkpoints a crash or a divergence cannot
    spoil. Same arguments as mmengine's; on top of it:

    - **atomic**: a checkpoint is written under a temporary name in its
      directory, flushed to disk and renamed; then ``last_checkpoint`` is
      replaced the same way; only then are checkpoints beyond
      ``max_keep_ckpts`` removed. Whenever the process dies (``SIGKILL``
      included), ``last_checkpoint`` names a complete checkpoint. (Local
      directories; other storage backends are written as mmengine does.)
    - **finite**: a model with a NaN or infinite parameter or buffer is not
      written; the run stops with an error naming the tensor and the last
      checkpoint written.
    - **random streams**: every rank's process-wide random state (Python,
      numpy, torch, CUDA) goes into ``meta['random_state']`` and is restored
      when training resumes from that checkpoint, right before its first
      iteration. With :class:`SIMTTrainLoop`, which resumes without
      redrawing data and loads every sample with its own seed, a killed and
      resumed run logs the same losses as an uninterrupted one.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resumed: Optional[tuple] = None

    # ----------------------------------------------------------- resuming
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        meta = checkpoint.get('meta', {})
        self._resumed = (meta.get('iter'), meta.get('random_state'))

    def before_train(self, runner) -> None:
        super().before_train(runner)
        resumed, self._resumed = self._resumed, None
        if resumed is None or not runner.iter or resumed[0] != runner.iter:
            return  # a fresh run, or weights loaded with load_from
        states: Optional[List[dict]] = resumed[1]
        world_size = runner.world_size
        if not states:
            print_log(
                'the resumed checkpoint holds no random state (not written '
                'by SafeCheckpointHook): the resumed run draws other random '
                'numbers than the interrupted one would have',
                logger='current',
                level=logging.WARNING)
        elif len(states) != world_size:
            print_log(
                f'the resumed checkpoint holds the random state of '
                f'{len(states)} ranks, this run has {world_size}: random '
                'streams are not restored',
                logger='current',
                level=logging.WARNING)
        else:
            set_random_state(states[get_rank()])

    # -------------------------------------------------------------- saving
    def _save_checkpoint_with_step(self, runner, step: int,
                                   meta: dict) -> None:
        filename = self.filename_tmpl.format(step)
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        bad = first_non_finite(model)
        if bad is not None:
            raise RuntimeError(
                f'iteration {runner.iter + 1}: {bad} holds NaN or infinite '
                f'values; {filename} is not written. The last checkpoint '
                f'written is {self.last_ckpt or "none"}')
        meta = dict(meta, random_state=all_gather_object(get_random_state()))

        removed: List[int] = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and
                                            self.keep_ckpt_ids[-1] == step):
            while len(self.keep_ckpt_ids) >= self.max_keep_ckpts:
                removed.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids',
                                           list(self.keep_ckpt_ids))
        path = self.file_backend.join_path(self.out_dir, filename)
        self.last_ckpt = path
        runner.message_hub.update_info('last_ckpt', path)

        atomic = isinstance(self.file_backend, LocalBackend)
        runner.save_checkpoint(
            self.out_dir,
            f'.{filename}.tmp' if atomic else filename,
            self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            backend_args=self.backend_args,
            **self.args)
        if not is_main_process():
            return
        if atomic:
            tmp = osp.join(self.out_dir, f'.{filename}.tmp')
            _fsync(tmp)
            os.replace(tmp, path)
        atomic_write(
            osp.join(runner.work_dir, 'last_checkpoint'), path.encode())
        for old in removed:
            self._remove(
                self.file_backend.join_path(self.out_dir,
                                            self.filename_tmpl.format(old)))

    def _remove(self, path: Any) -> None:
        if self.file_backend.isfile(path):
            self.file_backend.remove(path)
        elif self.file_backend.isdir(path):  # deepspeed checkpoints
            self.file_backend.rmtree(path)
