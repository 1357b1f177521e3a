"""A hook for the crash tests, imported by ``tools/train.py`` children.

``ResumeProbeHook`` appends every logged loss (``repr`` of the float, so
comparisons are bit-exact) and every validation metric to a text file, one
line per value, flushed at once; with ``kill_at`` it kills its own process
with SIGKILL after that many iterations (no clean-up of any kind runs), or,
with ``kill_in_write``, in the middle of writing that checkpoint file.
"""
import os
import signal
from typing import Optional

from mmengine.fileio.backends.local_backend import LocalBackend
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class ResumeProbeHook(Hook):
    """Record losses and metrics; kill the process when told to."""

    priority = 'LOWEST'

    def __init__(self,
                 out: str,
                 kill_at: Optional[int] = None,
                 kill_in_write: Optional[str] = None) -> None:
        self.out = out
        self.kill_at = kill_at
        if kill_in_write is not None:
            _kill_while_writing(kill_in_write)

    def _write(self, line: str) -> None:
        with open(self.out, 'a') as f:
            f.write(line + '\n')
            f.flush()

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None) -> None:
        rank = runner.rank
        for key, value in (outputs or {}).items():
            if key.endswith('/time') or key.startswith('dist/'):
                continue  # wall-clock figures
            self._write(f'{rank} {runner.iter} {key} {float(value)!r}')
        if self.kill_at is not None and runner.iter + 1 == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def after_val_epoch(self, runner, metrics=None) -> None:
        for key, value in (metrics or {}).items():
            self._write(f'{runner.rank} {runner.iter} val/{key} {value!r}')


def _kill_while_writing(name: str) -> None:
    """SIGKILL the process when half of the file ``name`` is written."""
    put = LocalBackend.put

    def dying_put(self, obj, filepath):
        if os.path.basename(str(filepath)).strip('.').startswith(name):
            with open(filepath, 'wb') as f:
                f.write(obj[:len(obj) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return put(self, obj, filepath)

    LocalBackend.put = dying_put
