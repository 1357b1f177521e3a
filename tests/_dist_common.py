"""Spawned gloo process groups for the distributed SIMT tests (CPU).

:func:`run_ranks` starts ``world_size`` processes running ``fn(rank,
world_size, *args)`` in an initialised gloo group and fails (killing them)
when they do not finish within ``timeout`` seconds, so a hang is a test
failure, not a stuck CI.
"""
import datetime
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _simt_common import require_marker

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, pg_timeout: float,
           fn: Callable, args: Sequence[Any], err_dir: str) -> None:
    for path in (str(REPO), str(REPO / 'tests')):
        if path not in sys.path:
            sys.path.insert(0, path)
    torch.set_num_threads(1)
    dist.init_process_group(
        'gloo',
        init_method=f'tcp://127.0.0.1:{port}',
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout))
    try:
        fn(rank, world_size, *args)
    except BaseException:
        Path(err_dir, f'rank{rank}.err').write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable,
              world_size: int,
              args: Sequence[Any] = (),
              timeout: float = 240,
              pg_timeout: float = 60,
              err_dir: str = '/tmp') -> None:
    """Run ``fn`` on ``world_size`` gloo ranks; raise on error or timeout.

    Raises:
        TimeoutError: The ranks did not all finish within ``timeout``.
        RuntimeError: A rank failed (its traceback in the message).
    """
    require_marker('dist', 'run_ranks starts a process group')
    os.makedirs(err_dir, exist_ok=True)
    ctx = mp.spawn(
        _entry,
        args=(world_size, free_port(), pg_timeout, fn, tuple(args), err_dir),
        nprocs=world_size,
        join=False)
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while not ctx.join(timeout=1):
            if datetime.datetime.now() > deadline:
                raise TimeoutError(
                    f'{world_size} ranks did not finish in {timeout} s')
    except mp.ProcessRaisedException as e:
        errors = [p.read_text() for p in sorted(Path(err_dir).glob('*.err'))]
        raise RuntimeError('\n'.join(errors) or str(e)) from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
