"""Benchmark LegoResNet-50 (k of N units active) against the stock ResNet-50.

Both run forward + backward on the same batch in the same process, in
alternating rounds; the script prints the median step time and peak memory
of each and their ratios (lego / stock).

    python tools/analysis_tools/benchmark_lego_resnet.py --batch 16
    python tools/analysis_tools/benchmark_lego_resnet.py --device cuda \
        --batch 256 --amp bf16 --channels-last

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU and, on the CPU,
the peak of the allocations the torch profiler records during one step
(activations, gradients and temporaries; the weights count for both).
"""
import argparse
import logging
import os.path as osp
import statistics
import sys
import time
from typing import Callable, Dict

import torch
from mmengine.logging import MMLogger

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmpretrain.models.backbones import ResNet  # noqa: E402

from projects.gppf import LegoResNet  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--depth', type=int, default=50)
    parser.add_argument('--num-legos', type=int, default=4)
    parser.add_argument('--num-active', type=int, default=2)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--amp', choices=['none', 'fp16', 'bf16'], default='none')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--threads', type=int, default=None)
    return parser.parse_args()


def make_step(model: torch.nn.Module, x: torch.Tensor,
              amp: str) -> Callable[[], None]:
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


def cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the live CPU allocations torch makes during ``step``."""
    from torch.profiler import ProfilerActivity, profile
    with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.events() if e.self_cpu_memory_usage != 0]
    events.sort(key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_bytes(step)


def main() -> None:
    args = parse_args()
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init logs
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    models: Dict[str, torch.nn.Module] = {
        'stock':
        ResNet(args.depth, out_indices=(0, 1, 2, 3)),
        'lego':
        LegoResNet(
            args.depth, num_legos=args.num_legos, num_active=args.num_active),
    }
    fmt = (torch.channels_last
           if args.channels_last else torch.contiguous_format)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    x = x.contiguous(memory_format=fmt)
    steps = {}
    for name, model in models.items():
        model.init_weights()
        model.to(device=device, memory_format=fmt).train()
        steps[name] = make_step(model, x, args.amp)
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    sync(device)
    times = {name: [] for name in steps}
    for _ in range(args.iters):
        for name, step in steps.items():  # alternate: same machine state
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    peak = {name: peak_bytes(step, device) for name, step in steps.items()}
    params = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in models.items()
    }
    active = models['lego'].num_active / models['lego'].num_legos
    where = (
        torch.cuda.get_device_name(device)
        if device.type == 'cuda' else f'{torch.get_num_threads()} threads')
    print(
        f'device={device} ({where}) depth={args.depth} '
        f'num_legos={args.num_legos} '
        f'num_active={args.num_active} batch={args.batch} '
        f'size={args.size} amp={args.amp} '
        f'channels_last={args.channels_last} iters={args.iters}')
    for name in steps:
        print(f'{name:>5}: {median[name] * 1e3:9.1f} ms/step  '
              f'{args.batch / median[name]:8.1f} img/s  '
              f'peak {peak[name] / 2**20:9.1f} MiB  '
              f'params {params[name] / 1e6:6.2f} M')
    print(f'ratio lego/stock: time {median["lego"] / median["stock"]:.3f}  '
          f'memory {peak["lego"] / peak["stock"]:.3f}  '
          f'(active fraction of lego units {active:.2f})')


if __name__ == '__main__':
    main()
