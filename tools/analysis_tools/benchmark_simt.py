"""Benchmark one SIMT iteration against the same single-task iterations.

In one process, with the same model and the same batches (one per task from
the config's ``train_dataloader``):

* ``simt``: ``model.train_step({task: batch for every task})``, i.e. every
  task's forward and backward in turn and one optimizer step;
* ``single[task]``: ``model.train_step({task: batch})``, one task's
  iteration (its forward, backward and optimizer step).

Reported: median wall time of each (``time ratio = simt / sum(single)``,
goal <= 1.02) and peak memory allocated during each step (``memory ratio =
simt / max(single)``, goal <= 1.15; CUDA: ``max_memory_allocated``, CPU: the
allocator's running total recorded by the PyTorch profiler).

Example::

    python tools/analysis_tools/benchmark_simt.py \
        configs/gppf/gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py --iters 10
"""
import argparse
import copy
import json
import os.path as osp
import statistics
import sys
import time
from typing import Any, Callable, Dict, Mapping, Optional

import torch

__all__ = ['peak_memory', 'time_call', 'benchmark', 'task_batches']


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it.

    Args:
        fn: The step to measure.
        device: ``cuda`` (``torch.cuda`` allocator statistics) or ``cpu``
            (allocation events of the PyTorch profiler, whose
            ``total_allocated`` is the CPU allocator's running total).

    Returns:
        int: Peak bytes.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        fn()
    peak, stack = 0, list(p.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and (
                node.extra_fields.device.type == 'cpu'):
            peak = max(peak, node.extra_fields.total_allocated)
    return peak


def time_call(fn: Callable[[], Any], device: torch.device,
              iters: int) -> float:
    """Median seconds of ``iters`` calls of ``fn``."""
    times = []
    for _ in range(iters):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark(model: torch.nn.Module,
              batches: Mapping[str, Any],
              optim_wrapper,
              iters: int = 10,
              warmup: int = 2) -> Dict[str, Any]:
    """Time and peak memory of a SIMT iteration vs single-task ones.

    Args:
        model: A :class:`GPPF` in train mode on its device.
        batches: One dataloader batch per task.
        optim_wrapper: The optimizer wrapper (steps every iteration).
        iters: Timed repetitions (median). warmup: untimed ones first.

    Returns:
        dict: ``simt_s``, ``single_s`` (per task), ``time_ratio``,
        ``simt_peak``, ``single_peak`` (per task, bytes), ``memory_ratio``
        and ``grad_bytes`` (all gradient buffers: a SIMT step keeps the
        ones earlier tasks filled while later tasks run, which bounds its
        excess over the largest task).
    """
    device = model.data_preprocessor.device

    def step(tasks):
        return lambda: model.train_step(
            {t: copy.deepcopy(batches[t])
             for t in tasks}, optim_wrapper)

    tasks = list(batches)
    runs = {'simt': step(tasks)}
    runs.update({t: step([t]) for t in tasks})
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    # Interleave the repetitions so that drift hits every run alike.
    times: Dict[str, list] = {name: [] for name in runs}
    for _ in range(iters):
        for name, fn in runs.items():
            times[name].append(time_call(fn, device, 1))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    peaks = {name: peak_memory(fn, device) for name, fn in runs.items()}
    single_s = {t: median[t] for t in tasks}
    single_peak = {t: peaks[t] for t in tasks}
    grad_bytes = sum(p.numel() * p.element_size()
                     for p in model.parameters() if p.requires_grad)
    return dict(
        grad_bytes=grad_bytes,
        device=str(device),
        iters=iters,
        simt_s=median['simt'],
        single_s=single_s,
        sum_single_s=sum(single_s.values()),
        time_ratio=median['simt'] / sum(single_s.values()),
        simt_peak=peaks['simt'],
        single_peak=single_peak,
        memory_ratio=peaks['simt'] / max(single_peak.values()))


def task_batches(cfg, seed: int = 0) -> Dict[str, Any]:
    """First batch of every task's ``train_dataloader`` of a config."""
    from mmengine.runner import Runner

    from projects.gppf.engine.task_loaders import task_keys
    from projects.gppf.models.task_config import scope_of, with_scope
    out = {}
    for task in task_keys(cfg.train_dataloader, 'train_dataloader'):
        loader_cfg = copy.deepcopy(cfg.train_dataloader[task])
        loader_cfg['num_workers'] = 0
        loader_cfg.pop('persistent_workers', None)
        if scope_of(loader_cfg['dataset']):
            loader_cfg['dataset'] = with_scope(loader_cfg['dataset'], '')
        out[task] = next(iter(Runner.build_dataloader(loader_cfg,
                                                      seed=seed)))
    return out


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', help='a GPPF config with train_dataloader')
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available()
                   else 'cpu')
    p.add_argument(
        '--amp', action='store_true', help='fp16 SIMTAmpOptimWrapper')
    p.add_argument('--cfg-options', nargs='+', default=[],
                   help='key=value overrides, e.g. '
                   'train_dataloader.mnist_det.batch_size=4')
    p.add_argument('--out', help='write the figures as JSON here')
    return p.parse_args(argv)


def main(argv: Optional[list] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    repo = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from mmengine.config import Config, DictAction
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, DefaultScope

    import projects.gppf  # noqa: F401  (registers GPPF)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        opts = argparse.ArgumentParser()
        opts.add_argument('o', nargs='+', action=DictAction)
        cfg.merge_from_dict(opts.parse_args(args.cfg_options).o)
    DefaultScope.get_instance(
        'benchmark_simt', scope_name=cfg.get('default_scope', 'mmengine'))
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model = model.to(device).train()
    optim_cfg = copy.deepcopy(cfg.optim_wrapper)
    if args.amp:
        optim_cfg['type'] = 'SIMTAmpOptimWrapper'
        optim_cfg.setdefault('loss_scale', 'dynamic')
    wrapper = build_optim_wrapper(model, optim_cfg)
    batches = task_batches(cfg)
    shapes = {
        t: (len(b['inputs']), tuple(b['inputs'][0].shape))
        for t, b in batches.items()
    }
    res = benchmark(model, batches, wrapper, args.iters, args.warmup)
    res.update(config=args.config, batches=shapes, amp=args.amp,
               torch=torch.__version__, threads=torch.get_num_threads())
    mib = 2.0**20
    print(f'device {res["device"]}, torch {res["torch"]}, '
          f'{res["threads"]} threads, median of {args.iters}')
    for task in batches:
        print(f'  single {task:14s} {res["single_s"][task] * 1e3:9.1f} ms '
              f'peak {res["single_peak"][task] / mib:8.1f} MiB  '
              f'batch {shapes[task]}')
    print(f'  sum of single        {res["sum_single_s"] * 1e3:9.1f} ms')
    print(f'  SIMT iteration       {res["simt_s"] * 1e3:9.1f} ms '
          f'peak {res["simt_peak"] / mib:8.1f} MiB')
    print(f'time ratio   SIMT / sum(single) = {res["time_ratio"]:.3f} '
          f'(goal <= 1.02)')
    print(f'memory ratio SIMT / max(single) = {res["memory_ratio"]:.3f} '
          f'(goal <= 1.15); excess '
          f'{(res["simt_peak"] - max(res["single_peak"].values())) / mib:.1f}'
          f' MiB, gradient buffers {res["grad_bytes"] / mib:.1f} MiB')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == '__main__':
    main()
