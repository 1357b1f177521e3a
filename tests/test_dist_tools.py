"""``torchrun`` launches on CPU: ``init_dist_env`` (gloo) and the
``tools/dist_train.sh`` / ``tools/dist_test.sh`` scripts.

Everything that starts a process group runs in a subprocess with a free
port and a timeout, so a hang fails the test instead of blocking.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _dist_common import free_port
from _simt_common import REPO, make_demo_data, runner_cfg
from mmengine.config import Config

from projects.gppf.utils.dist_env import cpu_model_wrapper_cfg, init_dist_env

PY = sys.executable
DIST_TRAIN = REPO / 'tools' / 'dist_train.sh'
DIST_TEST = REPO / 'tools' / 'dist_test.sh'
DEMO_CONFIG = 'configs/gppf/gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py'
NO_CUDA = 'Found no NVIDIA driver'
WRAPPER_ERROR = 'TypeError: SIMTTrainLoop: the model is wrapped by'


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    for key in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR',
                'MASTER_PORT'):
        env.pop(key, None)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(REPO), env.get('PYTHONPATH')) if p)
    env.update(extra)
    return env


# The child: patches CUDA availability (so the test means the same on a GPU
# machine), spies on init_process_group and prints what it saw.
_CHILD = textwrap.dedent('''
    import json, sys
    import torch
    import torch.distributed as dist
    from mmengine.config import Config
    from projects.gppf.utils import init_dist_env

    cuda, cfg = json.loads(sys.argv[1]), Config(json.loads(sys.argv[2]))
    torch.cuda.is_available = lambda: cuda
    calls, real_init = [], dist.init_process_group

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_init(*args, **kwargs)

    dist.init_process_group = spy
    init_dist_env(cfg)
    out = dict(initialized=dist.is_initialized(), calls=len(calls),
               dist_cfg=cfg.get('env_cfg', {}).get('dist_cfg'),
               wrapper=cfg.get('model_wrapper_cfg'))
    if dist.is_initialized():
        pg = dist.group.WORLD
        out.update(backend=dist.get_backend(), rank=dist.get_rank(),
                   world_size=dist.get_world_size(),
                   timeout_s=calls[0]['timeout'].total_seconds())
        backend = pg._get_backend(torch.device('cpu'))
        if hasattr(backend, 'options'):  # the group's own timeout
            out['pg_timeout_s'] = backend.options._timeout.total_seconds()
        t = torch.tensor([1.0])
        dist.all_reduce(t)  # the group works
        out['all_reduce'] = t.item()
        dist.destroy_process_group()
    print('RESULT ' + json.dumps(out))
''')


def run_child(cfg: dict, cuda: bool = False, timeout: float = 120) -> tuple:
    """Run ``init_dist_env(Config(cfg))`` as rank 0 of a 1-process job."""
    env = _env(
        RANK='0',
        LOCAL_RANK='0',
        WORLD_SIZE='1',
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        [PY, '-c', _CHILD, json.dumps(cuda),
         json.dumps(cfg)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines()
                if ln.startswith('RESULT '))
    return json.loads(line[len('RESULT '):]), proc.stdout + proc.stderr


dist_child = pytest.mark.dist  # a one-rank gloo group in a child process


@dist_child
def test_init_dist_env_gloo_on_cpu():
    result, log = run_child(
        dict(
            launcher='pytorch',
            env_cfg=dict(dist_cfg=dict(backend='nccl', timeout=77))))
    assert result['initialized'] and result['calls'] == 1
    assert result['backend'] == 'gloo'
    assert (result['rank'], result['world_size']) == (0, 1)
    assert result['timeout_s'] == 77
    assert result.get('pg_timeout_s', 77) == 77
    assert result['all_reduce'] == 1.0
    assert result['dist_cfg'] == dict(backend='gloo', timeout=77)
    # mmengine's default wrapper, made for a module on the CPU
    assert result['wrapper'] == dict(
        type='MMDistributedDataParallel',
        broadcast_buffers=False,
        find_unused_parameters=False,
        device_ids=None)
    assert log.count('gloo backend on CPU') == 1
    assert NO_CUDA not in log


@dist_child
def test_init_dist_env_default_timeout_and_missing_env_cfg():
    result, _ = run_child(dict(launcher='pytorch'))
    assert result['backend'] == 'gloo'
    assert result['timeout_s'] == 1800
    assert result['dist_cfg'] == dict(backend='gloo')


@dist_child
def test_init_dist_env_leaves_nccl_with_cuda_to_mmengine():
    # CUDA (patched in the child) and nccl: mmengine's init_dist sets the
    # device and initialises; nothing happens here.
    result, log = run_child(
        dict(launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend='nccl'))),
        cuda=True)
    assert not result['initialized'] and result['calls'] == 0
    assert result['dist_cfg'] == dict(backend='nccl')
    assert result['wrapper'] is None
    assert 'gloo' not in log


@dist_child
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason='gloo next to CUDA needs a GPU')
def test_init_dist_env_gloo_with_cuda():
    result, log = run_child(
        dict(launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend='gloo'))),
        cuda=True)
    assert result['backend'] == 'gloo'
    assert result['wrapper'] is None  # GPU: mmengine's device_ids stay
    assert 'gloo backend on CPU' not in log


def test_init_dist_env_noop_without_launcher(monkeypatch):
    import torch.distributed as dist
    for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    cfg = Config(dict(launcher='none', env_cfg=dict(dist_cfg=dict())))
    init_dist_env(cfg)
    assert not dist.is_initialized()
    assert cfg.env_cfg.dist_cfg == dict()
    assert 'model_wrapper_cfg' not in cfg
    # A launcher without torchrun's environment: a clear error, no hang.
    monkeypatch.setattr('torch.cuda.is_available', lambda: False)
    with pytest.raises(RuntimeError, match='RANK, WORLD_SIZE'):
        init_dist_env(Config(dict(launcher='pytorch')))
    assert not dist.is_initialized()


def test_cpu_model_wrapper_cfg():
    from mmengine.model import BaseModel
    from mmengine.registry import MODEL_WRAPPERS
    cfg = Config(
        dict(
            find_unused_parameters=True,
            model_wrapper_cfg=dict(type='MMSeparateDistributedDataParallel')))
    cpu_model_wrapper_cfg(cfg)  # a DDP subclass: device_ids=None
    assert cfg.model_wrapper_cfg == dict(
        type='MMSeparateDistributedDataParallel', device_ids=None)
    cfg = Config(dict(model_wrapper_cfg=dict(device_ids=[3])))
    cpu_model_wrapper_cfg(cfg)  # set by the user: kept
    assert cfg.model_wrapper_cfg.device_ids == [3]

    @MODEL_WRAPPERS.register_module(force=True)
    class _NotDDPWrapper(BaseModel):
        pass

    cfg = Config(dict(model_wrapper_cfg=dict(type='_NotDDPWrapper')))
    cpu_model_wrapper_cfg(cfg)  # not DDP: no device_ids argument
    assert cfg.model_wrapper_cfg == dict(type='_NotDDPWrapper')
    cfg = Config(dict(find_unused_parameters=True))
    cpu_model_wrapper_cfg(cfg)
    assert cfg.model_wrapper_cfg.find_unused_parameters is True


# ---------------------------------------------------------------- scripts


@pytest.mark.parametrize('script, args, usage', [
    (DIST_TRAIN, ['only_config'], 'CONFIG GPUS [train.py args]'),
    (DIST_TEST, ['config', 'ckpt'], 'CONFIG CHECKPOINT GPUS [test.py args]'),
])
def test_scripts_print_usage_without_enough_arguments(script, args, usage):
    """Too few arguments: the usage on stderr, exit 2, nothing started
    (even with PYTHONPATH unset under ``set -u``)."""
    assert os.access(script, os.X_OK), f'{script} is not executable'
    env = _env(PYTHON='/nonexistent/python')  # would fail if it were run
    env.pop('PYTHONPATH')
    proc = subprocess.run(['bash', str(script), *args],
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ''
    assert proc.stderr == f'usage: {script} {usage}\n'


def _fake_python(tmp_path: Path) -> Path:
    """An interpreter stand-in that prints its arguments and PYTHONPATH."""
    fake = tmp_path / 'python'
    fake.write_text('#!/usr/bin/env bash\n'
                    'printf "%s\\n" "PYTHONPATH=$PYTHONPATH" "$@"\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize('script, args, tool, forwarded', [
    (DIST_TRAIN, ['cfg.py', '3', '--resume'
                  ], 'train.py', ['cfg.py', '--resume']),
    (DIST_TEST, ['cfg.py', 'ckpt.pth', '2', '--out', 'x.pkl'
                 ], 'test.py', ['cfg.py', 'ckpt.pth', '--out', 'x.pkl']),
])
def test_scripts_hand_torchrun_the_tool_and_its_arguments(
        tmp_path, script, args, tool, forwarded):
    """The command line the scripts build: torchrun with the process count
    and port, the tool, its arguments, ``--launcher pytorch``; the
    repository first on PYTHONPATH."""
    env = _env(PYTHON=str(_fake_python(tmp_path)), PORT='29999')
    env['PYTHONPATH'] = '/elsewhere'
    proc = subprocess.run(['bash', str(script), *args],
                          cwd=tmp_path,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    nproc = args[1] if tool == 'train.py' else args[2]
    assert proc.stdout.splitlines() == [
        f'PYTHONPATH={REPO}:/elsewhere', '-m', 'torch.distributed.run',
        '--nnodes=1', '--node_rank=0', '--master_addr=127.0.0.1',
        f'--nproc_per_node={nproc}', '--master_port=29999',
        str(REPO / 'tools' / tool), *forwarded, '--launcher', 'pytorch'
    ]


def _tiny_config(tmp_path: Path, root: Path, **kwargs) -> Path:
    """The tiny SIMT set-up of ``_simt_common`` as a config file."""
    cfg = runner_cfg(root, tmp_path / 'work', val=False, **kwargs)
    cfg['custom_imports'] = dict(
        imports=['projects.gppf'], allow_failed_imports=False)
    cfg['log_level'] = 'INFO'
    path = tmp_path / 'tiny_simt.py'
    Config(cfg).dump(str(path))
    return path


def _run_script(args, timeout: float = 300, **env) -> tuple:
    env = _env(PORT=str(free_port()), PYTHON=PY, **env)
    env.pop('PYTHONPATH')  # the script puts the repository on it
    try:
        proc = subprocess.run(['bash', *map(str, args)],
                              cwd=REPO,
                              env=env,
                              capture_output=True,
                              text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f'{args[0]} hung for {timeout} s:\n{e.stdout}{e.stderr}')
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.dist
@pytest.mark.data
def test_dist_train_refuses_the_stock_ddp_wrapper(tmp_path):
    """A config without the SIMT wrapper gets mmengine's DDP (device_ids
    None on the CPU); both ranks get past gloo initialisation and stop in
    the train loop with the error that names the fix; torchrun ends both."""
    root = make_demo_data(tmp_path / 'data', num_train=4, num_val=2)
    config = _tiny_config(tmp_path, root, max_iters=2, batch_size=2)
    rc, log = _run_script([DIST_TRAIN, config, 2])
    assert NO_CUDA not in log, log[-4000:]
    assert 'gloo backend on CPU' in log, log[-4000:]
    assert 'world size 2' in log
    assert rc != 0
    assert f'[rank0]: {WRAPPER_ERROR}' in log, log[-4000:]
    assert f'[rank1]: {WRAPPER_ERROR}' in log, log[-4000:]
    assert "model_wrapper_cfg=dict(type='SIMTDistributedWrapper')" in log


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.data
@pytest.mark.timeout(1500)
def test_dist_train_runs_resumes_and_dist_test_evaluates(tmp_path):
    if not (REPO / 'data' / 'gppf_demo').is_dir():
        pytest.fail(
            'data/gppf_demo missing: run '
            'tools/dataset_converters/prepare_demo_data.sh',
            pytrace=False)
    work_dir = tmp_path / 'work'
    small = [
        'train_dataloader.mnist_det.batch_size=2',
        'train_dataloader.fmnist_seg.batch_size=2',
        'train_dataloader.fmnist_cls.batch_size=4',
        'val_dataloader.mnist_det.batch_size=8',
        'val_dataloader.fmnist_seg.batch_size=8',
        'val_dataloader.fmnist_cls.batch_size=64',
        'train_cfg.val_interval=1000',  # validation only after the last
        'default_hooks.logger.interval=1',
        'default_hooks.checkpoint.interval=3',
        'train_cfg.placement=split',
    ]
    rc, log = _run_script([
        DIST_TRAIN, DEMO_CONFIG, 2, '--work-dir', work_dir, '--cfg-options',
        'train_cfg.max_iters=3', *small
    ],
                          timeout=480)
    assert rc == 0, log[-6000:]
    assert 'Iter(train) [3/3]' in log
    assert (work_dir / 'iter_3.pth').is_file()

    rc, log = _run_script([
        DIST_TRAIN, DEMO_CONFIG, 2, '--work-dir', work_dir, '--resume',
        '--cfg-options', 'train_cfg.max_iters=5', *small
    ],
                          timeout=480)
    assert rc == 0, log[-6000:]
    assert 'resumed epoch: 0, iter: 3' in log, log[-6000:]
    assert 'Iter(train) [4/5]' in log and 'Iter(train) [5/5]' in log
    assert 'Iter(train) [1/5]' not in log
    assert (work_dir / 'iter_5.pth').is_file()
    assert NO_CUDA not in log

    # The standard test tool on 2 processes, in a fresh process (weights-only
    # loading of a full mmengine checkpoint), every task evaluated.
    rc, log = _run_script([
        DIST_TEST, DEMO_CONFIG, work_dir / 'iter_5.pth', 2, '--work-dir',
        tmp_path / 'test', '--cfg-options', *small[3:6],
        # 5 steps from FCOS's prior leave every score below 0.05: keep boxes
        'model.tasks.mnist_det.test_cfg.score_thr=0'
    ],
                          timeout=480)
    assert rc == 0, log[-6000:]
    for metric in ('mnist_det/coco/bbox_mAP', 'fmnist_seg/mIoU',
                   'fmnist_cls/accuracy/top1'):
        assert metric in log, (metric, log[-3000:])
