"""The harness ``benchmark_lego_resnet.py`` and ``benchmark_lego_vit.py``
share: a lego backbone against its stock backbone and against the stock
one's copy (the harness's own noise), forward + backward of one batch, one
step of each per round in an order that rotates between rounds; the fastest
and the median round, the median over rounds of the per-round ratio to
stock (the steps of one round run back to back, so the ratio cancels the
slow drift of a shared machine), and the peak memory of one step.

Peak memory is what one step allocates above what was live before it (the
parameters, the input): ``torch.cuda.max_memory_allocated`` on a GPU; on the
CPU, the running sum of the allocator's allocation and free records (the
torch profiler's ``[memory]`` events with ``profile_memory=True``, in time
order), so transients inside an op count. Process RSS or tracemalloc would
not isolate torch's tensors from the interpreter and the allocator's cache.
"""
import argparse
import copy
import logging
import os
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from mmengine.logging import MMLogger

__all__ = [
    'image_size', 'add_common_args', 'setup', 'make_step', 'sync',
    'cpu_peak_bytes', 'peak_bytes', 'compare', 'report'
]

Step = Callable[[], None]


def image_size(text: str) -> Tuple[int, int]:
    """``'224'`` or ``'800x1344'`` -> ``(height, width)`` (an argparse
    ``type``)."""
    parts = text.split('x')
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0
                                           for p in parts):
        raise argparse.ArgumentTypeError(
            f'{text!r} is not a size: expected S or HxW, e.g. 800x1344')
    height, width = int(parts[0]), int(parts[-1])
    return height, width


def add_common_args(parser: argparse.ArgumentParser, batch: int,
                    warmup: int) -> None:
    """The lego shape, batch, warm-up rounds, device, precision, threads."""
    parser.add_argument('--num-legos', type=int, default=4)
    parser.add_argument('--num-active', type=int, default=2)
    parser.add_argument('--batch', type=int, default=batch)
    parser.add_argument('--warmup', type=int, default=warmup)
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--amp', choices=['none', 'fp16', 'bf16'], default='none')
    parser.add_argument('--threads', type=int, default=None)


def setup(args: argparse.Namespace) -> torch.device:
    """Quiet the init logs, set the threads and the seed; the device."""
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch.device(args.device)


def make_step(model: torch.nn.Module, x: torch.Tensor, amp: str) -> Step:
    """One forward + backward of ``model`` on ``x`` (loss: the outputs'
    means), gradients dropped after it."""
    dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(amp)

    def step() -> None:
        with torch.autocast(
                x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = sum(o.float().mean() for o in model(x))
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return step


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def cpu_peak_bytes(step: Step) -> int:
    """Peak of the CPU bytes allocated and not yet freed during ``step``,
    from the profiler's per-allocation records."""
    from torch.profiler import ProfilerActivity, profile
    with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted((e.start_ns(), e.nbytes())
                     for e in prof.profiler.kineto_results.events()
                     if e.name() == '[memory]')
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_bytes(step: Step, device: torch.device) -> int:
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_bytes(step)


def compare(
    stock: torch.nn.Module,
    lego: torch.nn.Module,
    x: torch.Tensor,
    amp: str,
    rounds: int,
    warmup: int,
    memory_format: torch.memory_format = torch.contiguous_format
) -> Dict[str, Dict[str, float]]:
    """Time ``stock``, ``lego`` and ``stock2`` (a copy of the initialised
    ``stock``) on ``x``; per model: ``fastest`` and ``median`` seconds,
    ``paired`` (median of the per-round ratios to ``stock``), ``peak`` bytes
    and ``params``, plus ``load`` (the 1-minute load average before and
    after)."""
    load = os.getloadavg()[0]
    models = dict(stock=stock, lego=lego)
    for model in models.values():
        model.init_weights()
    models['stock2'] = copy.deepcopy(stock)
    device = x.device
    steps = {}
    for name, model in models.items():
        model.to(device=device, memory_format=memory_format).train()
        steps[name] = make_step(model, x, amp)
    for _ in range(warmup):
        for step in steps.values():
            step()
    sync(device)
    names: List[str] = list(steps)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % 3:] + names[:r % 3]:  # rotate the order
            sync(device)
            start = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    result = {
        name:
        dict(
            fastest=min(times[name]),
            median=statistics.median(times[name]),
            paired=statistics.median(
                t / s for t, s in zip(times[name], times['stock'])),
            peak=peak_bytes(steps[name], device),
            params=sum(p.numel() for p in models[name].parameters()))
        for name in names
    }
    result['load'] = dict(before=load, after=os.getloadavg()[0])
    return result


def report(result: Dict[str, Dict[str, float]], device: torch.device,
           settings: str) -> None:
    """Print the settings, each model's figures and the ratios to stock of
    lego and of stock2 (the noise): of the fastest rounds, and the median
    of the per-round ratios."""
    where = (
        torch.cuda.get_device_name(device)
        if device.type == 'cuda' else f'{torch.get_num_threads()} threads')
    load = result['load']
    print(f'device={device} ({where}) {settings} load(1 min)='
          f'{load["before"]:.1f}->{load["after"]:.1f} on '
          f'{os.cpu_count()} cpus')
    for name in ('stock', 'lego', 'stock2'):
        r = result[name]
        print(f'{name:>6}: fastest {r["fastest"] * 1e3:9.1f} ms  median '
              f'{r["median"] * 1e3:9.1f} ms  peak '
              f'{r["peak"] / 2**20:9.1f} MiB  params '
              f'{r["params"] / 1e6:6.2f} M')
    stock = result['stock']
    for name, what in (('lego', ''), ('stock2', ', harness noise')):
        r = result[name]
        print(f'ratio {name}/stock (fastest{what}): time '
              f'{r["fastest"] / stock["fastest"]:.3f}  memory '
              f'{r["peak"] / stock["peak"]:.3f}  per-round median time '
              f'{r["paired"]:.3f}')
