"""Running the GPPF experiment's runs: records, resume, metrics, scheduling.

A finished run leaves one JSON record, ``<work_dir>/records/<name>.json``,
written atomically; a rerun of the experiment skips every run whose record
has the same identity (command and resolved config) and restarts the others,
with ``--resume`` when their directory holds a checkpoint of the same
command. Runs go through a pool of ``jobs`` workers, longest first, a transfer
run once its source run is recorded.
"""
import glob
import json
import os
import os.path as osp
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from tools.analysis_tools.gppf_experiment_plan import (LEGO_ARMS, Run,
                                                       option_args)

__all__ = [
    'write_json', 'load_record', 'pending_runs', 'read_metrics',
    'read_iter_times', 'read_final_losses', 'read_loss_curve',
    'router_summary', 'execute', 'schedule', 'RunFailed', 'announce',
    'print_plan', 'run_all'
]

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
_MARKER = 'gppf_experiment_run.json'
_NOT_METRICS = ('time', 'data_time', 'step', 'iter', 'epoch', 'lr')


class RunFailed(RuntimeError):
    """A run's subprocess failed; the message names its log."""


def write_json(path: str, data: Any) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=osp.dirname(osp.abspath(path)), suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def record_path(work_dir: str, name: str) -> str:
    return osp.join(work_dir, 'records', f'{name}.json')


def load_record(work_dir: str, run: Run) -> Optional[dict]:
    """The run's record if it finished with this identity, else None."""
    path = record_path(work_dir, run.name)
    if not osp.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if record.get('identity') != run.identity(work_dir):
        return None
    return record


def pending_runs(work_dir: str, runs: Sequence[Run]) -> List[Run]:
    """The runs without a valid record (the ones a rerun must run)."""
    return [r for r in runs if load_record(work_dir, r) is None]


def _json_lines(run_dir: str):
    """Every JSON log line of a run dir, oldest timestamp dir first."""
    files = glob.glob(osp.join(run_dir, '*', 'vis_data', 'scalars.json'))
    files += glob.glob(osp.join(run_dir, '*', '*.json'))  # test logs
    for path in sorted(files, key=lambda p: (osp.relpath(p, run_dir), p)):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith('{'):
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue


def read_metrics(run_dir: str,
                 keys: Sequence[str],
                 fill: bool = False) -> Optional[dict]:
    """The last logged evaluation holding every key in ``keys``; with
    ``fill``, the last evaluation at all, its missing keys set to 0 (mmdet's
    ``CocoMetric`` logs nothing when a model detects nothing)."""
    found = None
    for entry in _json_lines(run_dir):
        if 'iter' in entry:  # a training log line
            continue
        if fill or all(k in entry for k in keys):
            found = {
                k: v
                for k, v in entry.items()
                if k not in _NOT_METRICS and isinstance(v, (int, float))
            }
    if found is not None and fill:
        found.update({k: 0.0 for k in keys if k not in found})
    return found


def _no_detections(log: str) -> bool:
    """Whether the last command in ``log`` found no detections at all."""
    if not osp.isfile(log):
        return False
    with open(log) as f:
        text = f.read()
    last = text[text.rfind('\n$ '):]
    return 'The testing results of the whole dataset is empty' in last


def _train_entries(run_dir: str) -> List[dict]:
    """Training log lines of the run's last attempt (``scalars.json``)."""
    files = sorted(
        glob.glob(osp.join(run_dir, '*', 'vis_data', 'scalars.json')))
    if not files:
        return []
    with open(files[-1]) as f:
        entries = [json.loads(x) for x in f if x.startswith('{')]
    return [e for e in entries if 'iter' in e and 'time' in e]


def read_iter_times(run_dir: str) -> Dict[str, float]:
    """Mean logged seconds per training iteration (first window left out)
    of the run's last attempt, and of each task (``<task>/time``)."""
    train = _train_entries(run_dir)
    values: Dict[str, List[float]] = {}
    for entry in train[1:] or train:
        for key, value in entry.items():
            if key == 'time' or key.endswith('/time'):
                values.setdefault(key, []).append(float(value))
    return {k: sum(v) / len(v) for k, v in values.items()}


def read_loss_curve(run_dir: str) -> List[Tuple[int, float]]:
    """``(iteration, total loss)`` of every logging window of the run's
    last attempt."""
    return [(int(e['iter']), float(e['loss'])) for e in _train_entries(run_dir)
            if 'loss' in e]


def read_final_losses(run_dir: str) -> Dict[str, float]:
    """Per task, the sum of its loss terms in the last logging window
    (``<task>/loss...``); ``loss``: the total."""
    train = _train_entries(run_dir)
    out: Dict[str, float] = {}
    for key, value in (train[-1] if train else {}).items():
        if 'loss' not in key:
            continue
        group = key.split('/', 1)[0] if '/' in key else 'loss'
        if key == 'loss' or '/' in key:
            out[group] = out.get(group, 0.0) + float(value)
    return out


def router_summary(checkpoint: str, seed: int, router_cfg: dict,
                   log_interval: int) -> Optional[dict]:
    """What ``TaskRouterHook`` logged (its message-hub scalars, saved in the
    checkpoint) and the final routes against the initial random ones.

    Returns:
        dict: ``unit_share`` ``{task: [share of lego layers using unit n]}``
        and ``overlap`` (last logged values), ``overlap_history``
        (``[[iteration, overlap], ...]``), ``frozen`` per task,
        ``route_changed`` ``{task: layers whose route differs from the
        initial one}``; None for a checkpoint without a router.
    """
    import torch

    import projects.gppf  # noqa: F401  (weights-only loading globals)
    from projects.gppf.models.lego.router import TaskRouter
    ckpt = torch.load(checkpoint, map_location='cpu')
    state = ckpt['state_dict']
    prefix = 'backbone.router.'
    if prefix + 'logits' not in state:
        return None
    logits = state[prefix + 'logits']
    num_tasks, num_layers, num_legos = logits.shape
    num_active = state[prefix + 'frozen_indices'].shape[-1]
    from projects.gppf.models import unpack_state
    extra = unpack_state(state[prefix + '_extra_state'])
    tasks = list(extra['tasks'])
    kwargs = {k: v for k, v in router_cfg.items() if k != 'seed'}
    final = TaskRouter(tasks, num_layers, num_legos, num_active, **kwargs)
    final.load_state_dict({
        k[len(prefix):]: v
        for k, v in state.items() if k.startswith(prefix)
    })
    start = TaskRouter(
        tasks, num_layers, num_legos, num_active, seed=seed, **kwargs)
    scalars = ckpt.get('message_hub', {}).get('log_scalars', {})
    out: Dict[str, Any] = dict(
        unit_share={}, frozen=dict(zip(tasks, final.frozen)))
    for task in tasks:
        share = []
        for n in range(num_legos):
            buf = scalars.get(f'router/{task}/unit{n}')
            share.append(float(buf.data[0][-1]) if buf is not None else None)
        out['unit_share'][task] = share
    buf = scalars.get('router/overlap')
    if buf is not None:
        hist = [float(v) for v in buf.data[0]]
        out['overlap'] = hist[-1]
        out['overlap_history'] = [[log_interval * (i + 1), v]
                                  for i, v in enumerate(hist)]
    out['route_changed'] = {
        t: int((final.greedy_indices(t)
                != start.greedy_indices(t)).any(1).sum())
        for t in tasks
    }
    out['num_layers'] = num_layers
    return out


def _run_logged(cmd: List[str], log: str, env: dict) -> Dict[str, float]:
    """Run ``cmd`` from the repository root, output appended to ``log``;
    returns its wall and CPU seconds. Raises RunFailed on a non-zero exit."""
    os.makedirs(osp.dirname(log), exist_ok=True)
    start = time.time()
    with open(log, 'a') as out:
        out.write(f'\n$ {" ".join(cmd)}\n')
        out.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log) as f:
            tail = ''.join(f.readlines()[-15:])
        raise RunFailed(f'{" ".join(cmd[:3])} failed (exit '
                        f'{proc.returncode}); log: {log}\n{tail}')
    return dict(
        wall_s=time.time() - start, cpu_s=usage.ru_utime + usage.ru_stime)


def _env(threads: int) -> dict:
    env = dict(os.environ)
    for key in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
        env[key] = str(threads)
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    return env


def _fresh_dir(run_dir: str, identity: str) -> dict:
    """Keep ``run_dir`` only if it holds this identity's (partial) run;
    returns its marker (identity, seconds spent so far)."""
    path = osp.join(run_dir, _MARKER)
    marker = dict(identity=identity, wall_s=0.0, cpu_s=0.0)
    if osp.isdir(run_dir):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        if old.get('identity') == identity:
            marker.update(old)
        else:  # another command's leftovers: start afresh
            shutil.rmtree(run_dir)
    write_json(path, marker)
    return marker


def _train_and_evaluate(run: Run, work_dir: str, log: str, env: dict,
                        marker: dict) -> Tuple[dict, str]:
    """Export, train (resume) and evaluate as needed: the metrics and a
    note; the seconds spent are added up in ``marker`` (kept on disk)."""
    run_dir, ckpt = run.run_dir(work_dir), run.checkpoint(work_dir)
    keys = list(run.metrics.values())

    def call(cmd: List[str]) -> None:
        for key, value in _run_logged(cmd, log, env).items():
            marker[key] += value
        write_json(osp.join(run_dir, _MARKER), marker)

    if run.export is not None and not _newer(run.export[2], run.export[0]):
        call([
            sys.executable, 'tools/model_converters/lego2resnet.py',
            *run.export
        ])
    metrics = read_metrics(run_dir, keys) if osp.isfile(ckpt) else None
    if metrics is None and not osp.isfile(ckpt):
        cmd = run.command(work_dir, sys.executable)
        if osp.isfile(osp.join(run_dir, 'last_checkpoint')):
            cmd.insert(3, '--resume')
        call(cmd)
        metrics = read_metrics(run_dir, keys)
    if metrics is None and not _no_detections(log):
        # trained, but its evaluation did not finish
        call([
            sys.executable, 'tools/test.py', run.config, ckpt, '--work-dir',
            run_dir, '--cfg-options'
        ] + option_args(run.options))
        metrics = read_metrics(run_dir, keys)
    note = ''
    if metrics is None and _no_detections(log):
        metrics = read_metrics(run_dir, keys, fill=True)
        note = 'a detector found nothing: its mAP counted as 0'
    if metrics is None:
        raise RunFailed(f'{run.name}: no evaluation with {keys} in the logs '
                        f'under {run_dir}; log: {log}')
    return metrics, note


def execute(run: Run, work_dir: str, threads: int, router_cfg: dict) -> dict:
    """Train (or resume) ``run``, evaluate it, and write its record."""
    identity = run.identity(work_dir)
    marker = _fresh_dir(run.run_dir(work_dir), identity)
    log = osp.join(work_dir, 'logs', f'{run.name}.log')
    metrics, note = _train_and_evaluate(run, work_dir, log, _env(threads),
                                        marker)
    record = dict(
        name=run.name,
        kind=run.kind,
        arm=run.arm,
        seed=run.seed,
        tasks=list(run.tasks),
        identity=identity,
        command=run.command(work_dir),
        config_sha=run.config_sha,
        metrics=metrics,
        primary={
            t: metrics[k]
            for t, k in run.metrics.items()
        },
        iter_times=read_iter_times(run.run_dir(work_dir)),
        losses=read_final_losses(run.run_dir(work_dir)),
        threads=threads,
        finished=time.strftime('%Y-%m-%d %H:%M:%S'),
        note=note,
        wall_s=marker['wall_s'],
        cpu_s=marker['cpu_s'])
    if run.kind == 'pretrain' and run.arm in LEGO_ARMS:
        interval = [
            v for k, v in run.options.items()
            if k.startswith('custom_hooks.') and k.endswith('.log_interval')
        ]
        record['router'] = router_summary(
            run.checkpoint(work_dir), run.seed, router_cfg, (interval
                                                             or [1])[0])
    write_json(record_path(work_dir, run.name), record)
    return record


def announce(record: dict) -> dict:
    """Print a finished run's primary metrics and wall time; return it."""
    values = ', '.join(f'{t} {v:.4g}' for t, v in record['primary'].items())
    print(
        f'[{time.strftime("%H:%M:%S")}] {record["name"]}: {values} '
        f'({record["wall_s"]:.0f} s)',
        flush=True)
    return record


def _newer(path: str, than: str) -> bool:
    return osp.isfile(path) and osp.getmtime(path) >= osp.getmtime(than)


Work = Callable[[Run], dict]
Cost = Callable[[Run], float]


def schedule(runs: Sequence[Run], jobs: int, work: Work, cost: Cost,
             done: Sequence[str]) -> Dict[str, dict]:
    """Run ``work(run)`` on ``jobs`` workers, each after its ``source``:
    runs that others wait for first, then the longest ``cost`` first; the
    first failure stops new starts and is raised once the started runs
    end."""
    finished = set(done)
    needed = {r.source for r in runs}
    todo = sorted(
        runs, key=lambda r: (r.name in needed, cost(r)), reverse=True)
    results: Dict[str, dict] = {}
    failure: Optional[BaseException] = None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: Dict[Any, Run] = {}
        while todo or running:
            ready = [
                r for r in todo if r.source is None or r.source in finished
            ]
            while failure is None and ready and len(running) < jobs:
                run = ready.pop(0)
                todo.remove(run)
                running[pool.submit(work, run)] = run
            if not running:
                break
            complete, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in complete:
                run = running.pop(future)
                try:
                    results[run.name] = future.result()
                    finished.add(run.name)
                except BaseException as exc:  # noqa: B902
                    failure = failure or exc
    if failure is not None:
        raise failure
    if todo:
        missing = ', '.join(sorted({str(r.source) for r in todo}))
        raise RunFailed(f'runs whose source never finished: {missing}')
    return results


def print_plan(runs: Sequence[Run], done: Sequence[str],
               work_dir: str) -> None:
    """Print each run's command, ``[done]`` before the recorded ones."""
    for run in runs:
        print(('[done] ' if run.name in done else '') +
              shlex.join(run.command(work_dir)))


def run_all(tool: str, todo: Sequence[Run], done: Sequence[str], work_dir: str,
            jobs: int, threads: int, router_cfg: dict, cost: Cost) -> bool:
    """:func:`execute` and :func:`announce` every run of ``todo`` on
    ``jobs`` workers (:func:`schedule`). On a failed run or an interrupt,
    say on stderr, as ``tool``, that the finished runs are recorded and the
    same command resumes, and return False."""
    try:
        schedule(todo, jobs,
                 lambda r: announce(execute(r, work_dir, threads, router_cfg)),
                 cost, done)
    except (RunFailed, KeyboardInterrupt) as exc:
        print(
            f'{tool}: {str(exc) or "interrupted"}\nFinished runs are '
            'recorded; rerun the same command to resume.',
            file=sys.stderr)
        return False
    return True
