"""Throughput of distributed SIMT: 1 process against N processes.

Every setting runs in freshly spawned processes with the config's model
(same seed) and the first batch of every task of its ``train_dataloader``
(loaded once, reused, so data loading is not timed):

* ``1 process``: ``GPPF.train_step`` on every task, all the CPU threads
  (``--threads``, default: all cores) or the one GPU;
* ``N x split``: :class:`SIMTDistributedWrapper` with the ``split``
  placement, the costs being the tasks' times measured in the 1-process run
  (longest-processing-time packing), ``threads / N`` threads per rank;
* ``N x all``: every rank runs every task.

With ``--rank-threads`` equal to ``--threads``, every rank has as many
threads as the 1-process run (the scaling where the machine has the
cores); by default the N ranks share the 1-process run's threads.

Reported per setting: median iteration time (the slowest rank's, as the
ranks synchronise every step), images per iteration over all ranks,
throughput (images/s) and its ratio to the 1-process run (goal for split:
>= 1.8 at N=2 where the machine has the cores), the bound that the
placement's balance puts on that ratio (sum of the measured task times over
the largest rank's share), and per rank the median time spent waiting for
the other ranks (in the first collective), the synchronisation time
(gradients and norm statistics) and MiB sent per iteration.

Example::

    python tools/analysis_tools/benchmark_simt_dist.py \\
        configs/gppf/gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py --procs 2
"""
import argparse
import copy
import datetime
import json
import os
import os.path as osp
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _setup(threads: int, cfg_path: str, cfg_options: List[str]):
    for path in (REPO, osp.join(REPO, 'tools', 'analysis_tools')):
        if path not in sys.path:
            sys.path.insert(0, path)
    torch.set_num_threads(threads)
    from mmengine.config import Config, DictAction
    from mmengine.registry import DefaultScope

    import projects.gppf  # noqa: F401
    cfg = Config.fromfile(cfg_path)
    if cfg_options:
        opts = argparse.ArgumentParser()
        opts.add_argument('o', nargs='+', action=DictAction)
        cfg.merge_from_dict(opts.parse_args(cfg_options).o)
    DefaultScope.get_instance(
        f'benchmark_simt_dist_{os.getpid()}',
        scope_name=cfg.get('default_scope', 'mmengine'))
    return cfg


def _build(cfg, device: torch.device):
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model = model.to(device).train()
    return model, build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))


def _run(rank: int, world: int, setting: Dict[str, Any], out: str) -> None:
    """One rank of one setting; writes its timings to ``out``."""
    cfg = _setup(setting['threads'], setting['config'], setting['options'])
    from benchmark_simt import task_batches
    cuda = setting['device'] == 'cuda'
    device = torch.device('cuda', rank) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
    placement = setting['placement']
    if placement is not None:
        import torch.distributed as dist
        dist.init_process_group(
            'nccl' if cuda else 'gloo',
            init_method=f'tcp://127.0.0.1:{setting["port"]}',
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=300))
    batches = task_batches(cfg)
    model, optim = _build(cfg, device)
    step = model.train_step
    mine = list(batches)
    wrapper = None
    if placement is not None:
        from projects.gppf.engine.task_placement import (plan_placement,
                                                         ranks_of)
        from projects.gppf.models import SIMTDistributedWrapper
        plan = plan_placement(placement, model.task_names, world)
        wrapper = SIMTDistributedWrapper(model)
        wrapper.set_task_ranks(ranks_of(plan))
        step = wrapper.train_step
        mine = plan[rank]
    data = {t: batches[t] for t in model.task_names if t in mine}
    images = sum(len(b['inputs']) for b in data.values())
    times, waits, syncs, mbs = [], [], [], []
    task_times: Dict[str, List[float]] = {t: [] for t in data}
    for i in range(setting['warmup'] + setting['iters']):
        start = time.perf_counter()
        log_vars = step(copy.deepcopy(data), optim)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if i < setting['warmup']:
            continue
        times.append(elapsed)
        for t in data:
            task_times[t].append(float(log_vars[f'{t}/time']))
        if wrapper is not None:
            waits.append(wrapper.last_sync['wait'])
            syncs.append(wrapper.last_sync['time'])
            mbs.append(wrapper.last_sync['bytes'] / 2**20)
    result = dict(
        rank=rank,
        tasks=list(data),
        images=images,
        time=statistics.median(times),
        task_time={
            t: statistics.median(v)
            for t, v in task_times.items()
        },
        wait_time=statistics.median(waits) if waits else 0.0,
        sync_time=statistics.median(syncs) if syncs else 0.0,
        sync_mib=statistics.median(mbs) if mbs else 0.0)
    Path(out, f'rank{rank}.json').write_text(json.dumps(result))
    if placement is not None:
        import torch.distributed as dist
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_setting(world: int, setting: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Spawn ``world`` ranks of ``setting``; their results, by rank."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out:
        setting = dict(setting, port=_free_port())
        mp.spawn(_run, args=(world, setting, out), nprocs=world, join=True)
        return [
            json.loads(Path(out, f'rank{r}.json').read_text())
            for r in range(world)
        ]


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', help='a GPPF config with train_dataloader')
    p.add_argument('--procs', type=int, default=2, help='N')
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument(
        '--threads',
        type=int,
        default=os.cpu_count(),
        help='CPU threads of the 1-process run (split over '
        'the N ranks)')
    p.add_argument(
        '--rank-threads',
        type=int,
        help='CPU threads per rank of the N-process runs '
        '(default: threads // N)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--placements', nargs='+', default=['split', 'all'])
    p.add_argument('--cfg-options', nargs='+', default=[])
    p.add_argument('--out', help='write the figures as JSON here')
    return p.parse_args(argv)


def main(argv: Optional[list] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    common = dict(
        config=args.config,
        options=args.cfg_options,
        device=args.device,
        iters=args.iters,
        warmup=args.warmup)
    base = run_setting(1, dict(common, placement=None,
                               threads=args.threads))[0]
    base_tput = base['images'] / base['time']
    report: Dict[str, Any] = dict(
        config=args.config,
        device=args.device,
        cores=os.cpu_count(),
        torch=torch.__version__,
        baseline=dict(base, throughput=base_tput))
    print(f'{args.device}, {os.cpu_count()} cores, torch {torch.__version__}'
          f', median of {args.iters} iterations')
    print(f'  1 process ({args.threads} threads): {base["time"]*1e3:8.1f} '
          f'ms/iter, {base["images"]} images, {base_tput:7.1f} images/s; '
          'task ms: ' + ', '.join(f'{t} {v*1e3:.0f}'
                                  for t, v in base['task_time'].items()))
    threads = args.rank_threads or max(args.threads // args.procs, 1)
    for kind in args.placements:
        placement = kind if kind == 'all' else dict(
            type='split', costs=base['task_time'])
        ranks = run_setting(args.procs,
                            dict(common, placement=placement, threads=threads))
        it = max(r['time'] for r in ranks)
        images = sum(r['images'] for r in ranks)
        tput = images / it
        report[f'{args.procs}x{kind}'] = dict(
            ranks=ranks,
            time=it,
            images=images,
            throughput=tput,
            speedup=tput / base_tput)
        bound = None
        if kind == 'split':
            from projects.gppf.engine.task_placement import (plan_placement,
                                                             rank_loads)
            costs = base['task_time']
            plan = plan_placement(placement, list(costs), args.procs)
            bound = sum(costs.values()) / max(rank_loads(plan, costs))
            report[f'{args.procs}x{kind}']['balance_bound'] = bound
        print(f'  {args.procs} x {kind:5s} ({threads} threads each): '
              f'{it*1e3:8.1f} ms/iter, {images} images, {tput:7.1f} '
              f'images/s, speedup {tput / base_tput:.2f}' +
              (f' (balance bound {bound:.2f})' if bound else ''))
        for r in ranks:
            print(f'    rank {r["rank"]}: {", ".join(r["tasks"])}: '
                  f'{r["time"]*1e3:.1f} ms, waiting for the other ranks '
                  f'{r["wait_time"]*1e3:.1f} ms, sync {r["sync_time"]*1e3:.1f}'
                  f' ms, {r["sync_mib"]:.2f} MiB sent per iteration')
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == '__main__':
    main()
