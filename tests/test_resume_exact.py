"""A run killed with SIGKILL and resumed logs, bit for bit, what the
uninterrupted run logs: the demo config as shipped (FCN dropout, random
flips, router noise, warm-up and freeze), on small real data, in real
``tools/train.py`` processes, with and without dataloader workers, killed
between checkpoints or in the middle of writing one."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _dist_common import free_port
from _simt_common import REPO, make_demo_data

DEMO = REPO / 'configs' / 'gppf' / 'gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py'
MAX_ITERS = 14
pytestmark = [pytest.mark.slow, pytest.mark.data, pytest.mark.timeout(1200)]


def _config(path: Path, probe: Path, num_workers: int = 0, **kill) -> Path:
    workers = ', '.join(f'{t}=dict(num_workers={num_workers}, '
                        f'persistent_workers={num_workers > 0})'
                        for t in ('mnist_det', 'fmnist_seg', 'fmnist_cls'))
    path.write_text(f"""
_base_ = [{str(DEMO)!r}]
custom_imports = dict(
    imports=['projects.gppf', '_resume_probe'], allow_failed_imports=False)
train_dataloader = dict({workers})
train_cfg = dict(max_iters={MAX_ITERS}, val_interval={MAX_ITERS})
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval=5, max_keep_ckpts=1))
custom_hooks = [
    dict(type='TaskRouterHook', noise_std=(1.0, 0.0), warmup_iters=3,
         freeze_iter=11, log_interval=5),
    dict(type='ResumeProbeHook', out={str(probe)!r}, **{kill!r}),
]
""")
    return path


def _train(cwd: Path,
           config: Path,
           work_dir: Path,
           *args,
           procs: int = 1) -> int:
    """``tools/train.py`` (``procs=1``) or ``tools/dist_train.sh``; returns
    0, or ``-SIGKILL`` (train.py), or 1 (torchrun, a rank was killed)."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(REPO), str(REPO / 'tests'),
         env.get('PYTHONPATH', '')])
    tail = [str(config), '--work-dir', str(work_dir), *args]
    if procs == 1:
        cmd = [sys.executable, str(REPO / 'tools' / 'train.py'), *tail]
        killed = -signal.SIGKILL
    else:
        env.update(PYTHON=sys.executable, PORT=str(free_port()))
        cmd = [
            'bash',
            str(REPO / 'tools' / 'dist_train.sh'), tail[0],
            str(procs), *tail[1:]
        ]
        killed = 1
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    if proc.returncode == killed and procs > 1:
        assert 'Signal 9 (SIGKILL)' in proc.stdout + proc.stderr
        return -signal.SIGKILL
    if proc.returncode not in (0, -signal.SIGKILL):
        pytest.fail(f'train.py exited {proc.returncode}:\n'
                    f'{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')
    return proc.returncode


def _records(probe: Path) -> dict:
    out = {}
    for line in probe.read_text().splitlines():
        rank, it, key, value = line.split(' ', 3)
        out[(int(rank), int(it), key)] = value
    return out


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory) -> Path:
    """A working directory whose data/gppf_demo holds small demo data."""
    cwd = tmp_path_factory.mktemp('demo')
    root = make_demo_data(
        tmp_path_factory.mktemp('data'),
        dict(mnist_det=24, fmnist_seg=24, fmnist_cls=96),
        num_val=16)
    (cwd / 'data').mkdir()
    (cwd / 'data' / 'gppf_demo').symlink_to(root, target_is_directory=True)
    return cwd


@pytest.fixture(scope='module')
def uninterrupted(demo_dir) -> dict:
    probe = demo_dir / 'full.txt'
    config = _config(demo_dir / 'full.py', probe)
    assert _train(demo_dir, config, demo_dir / 'work_full') == 0
    return _records(probe)


@pytest.mark.parametrize(
    'name, num_workers, kill, resumed_from',
    [
        ('between', 0, dict(kill_at=12), 10),
        ('workers', 2, dict(kill_at=12), 10),
        # iter_5.pth is the one checkpoint kept (max_keep_ckpts=1): it must
        # survive a death in the middle of writing iter_10.pth
        ('in_write', 0, dict(kill_in_write='iter_10.pth'), 5),
    ])
def test_sigkill_then_resume_logs_the_same(demo_dir, uninterrupted, name,
                                           num_workers, kill, resumed_from):
    work_dir = demo_dir / f'work_{name}'
    killed_probe = demo_dir / f'{name}_killed.txt'
    config = _config(demo_dir / f'{name}.py', killed_probe, num_workers,
                     **kill)
    assert _train(demo_dir, config, work_dir) == -signal.SIGKILL
    last = (work_dir / 'last_checkpoint').read_text().strip()
    assert Path(last).name == f'iter_{resumed_from}.pth'
    assert Path(last).is_file()

    resumed_probe = demo_dir / f'{name}_resumed.txt'
    config = _config(demo_dir / f'{name}_resume.py', resumed_probe,
                     num_workers)
    assert _train(demo_dir, config, work_dir, '--resume') == 0

    killed, resumed = _records(killed_probe), _records(resumed_probe)
    assert killed and all(k in uninterrupted for k in killed)
    assert {k: uninterrupted[k] for k in killed} == killed
    assert min(it for _, it, _ in resumed) == resumed_from
    want = {k: v for k, v in uninterrupted.items() if k[1] >= resumed_from}
    assert resumed == want  # every loss and metric, bit for bit
    assert any(k[2].startswith('val/') for k in resumed)


@pytest.mark.parametrize('placement', ['all', 'split'])
def test_two_processes_killed_then_resumed_log_the_same(demo_dir, placement):
    """``dist_train.sh`` with 2 processes: both ranks die (SIGKILL) at
    iteration 12, the resumed pair logs what an uninterrupted pair logs."""
    extra = ['--cfg-options', f'train_cfg.placement={placement}']
    probe = demo_dir / f'dist_{placement}_full.txt'
    config = _config(demo_dir / f'dist_{placement}_full.py', probe)
    assert _train(
        demo_dir,
        config,
        demo_dir / f'work_dist_{placement}_full',
        *extra,
        procs=2) == 0
    uninterrupted = _records(probe)
    assert {k[0] for k in uninterrupted} == {0, 1}

    work_dir = demo_dir / f'work_dist_{placement}'
    probe = demo_dir / f'dist_{placement}_killed.txt'
    config = _config(demo_dir / f'dist_{placement}_kill.py', probe, kill_at=12)
    assert _train(
        demo_dir, config, work_dir, *extra, procs=2) == -signal.SIGKILL
    killed = _records(probe)
    assert {k: uninterrupted[k] for k in killed} == killed

    probe = demo_dir / f'dist_{placement}_resumed.txt'
    config = _config(demo_dir / f'dist_{placement}_resume.py', probe)
    assert _train(demo_dir, config, work_dir, '--resume', *extra, procs=2) == 0
    resumed = _records(probe)
    want = {k: v for k, v in uninterrupted.items() if k[1] >= 10}
    assert resumed == want
