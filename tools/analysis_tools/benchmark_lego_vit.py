"""Benchmark LegoViT (k of N units active) against mmpretrain's ViT.

Forward + backward of the same batch, in one process: every round runs one
step of each model (the stock ViT, the LegoViT and a second stock ViT, the
baseline measured against itself), in an order that rotates between rounds.
Ratios compare the fastest rounds (shared machines make medians scatter);
the stock/stock ratio shows the harness's own noise.

    python tools/analysis_tools/benchmark_lego_vit.py --arch base \
        --batch 4 --img-size 224 --rounds 20
    python tools/analysis_tools/benchmark_lego_vit.py --arch deit-small \
        --num-active 2 --rounds 3

Peak memory is what one step allocates above what was live before it (the
parameters, the input): ``torch.cuda.max_memory_allocated`` on a GPU; on the
CPU, the running sum of the allocator's allocation and free records (the
torch profiler's ``[memory]`` events with ``profile_memory=True``, in time
order), so transients inside an op count. Process RSS or tracemalloc would
not isolate torch's tensors from the interpreter and the allocator's cache.
"""
import argparse
import logging
import os
import os.path as osp
import statistics
import sys
import time
from typing import Callable, Dict

import torch
from mmengine.logging import MMLogger

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from benchmark_lego_resnet import make_step, sync  # noqa: E402
from mmpretrain.models.backbones import VisionTransformer  # noqa: E402

from projects.gppf import LegoViT  # noqa: E402


def cpu_peak_bytes(step: Callable[[], None]) -> int:
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


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_bytes(step)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--arch', default='base', help='a VisionTransformer arch name')
    parser.add_argument('--patch-size', type=int, default=16)
    parser.add_argument('--num-legos', type=int, default=4)
    parser.add_argument('--num-active', type=int, default=2)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--amp', choices=['none', 'fp16', 'bf16'], default='none')
    parser.add_argument('--threads', type=int, default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    load = os.getloadavg()[0]
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    common = dict(
        arch=args.arch, img_size=args.img_size, patch_size=args.patch_size)
    stock = VisionTransformer(**common)
    models: Dict[str, torch.nn.Module] = {
        'stock':
        stock,
        'lego':
        LegoViT(
            num_legos=args.num_legos, num_active=args.num_active, **common),
        'stock2':
        VisionTransformer(**common),
    }
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    steps = {}
    for name, model in models.items():
        model.init_weights()
        if name == 'stock2':
            model.load_state_dict(stock.state_dict())
        model.to(device).train()
        steps[name] = make_step(model, x, args.amp)
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    sync(device)
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:  # rotate the order
            sync(device)
            start = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    fastest = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    peak = {name: peak_bytes(steps[name], device) for name in names}
    params = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in models.items()
    }
    where = (
        torch.cuda.get_device_name(device)
        if device.type == 'cuda' else f'{torch.get_num_threads()} threads')
    print(f'device={device} ({where}) arch={args.arch} '
          f'num_legos={args.num_legos} num_active={args.num_active} '
          f'batch={args.batch} img_size={args.img_size} amp={args.amp} '
          f'rounds={args.rounds} load(1 min)={load:.1f}->'
          f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus')
    for name in names:
        print(f'{name:>6}: fastest {fastest[name] * 1e3:9.1f} ms  median '
              f'{median[name] * 1e3:9.1f} ms  peak '
              f'{peak[name] / 2**20:9.1f} MiB  params '
              f'{params[name] / 1e6:6.2f} M')
    print(f'ratio lego/stock (fastest): time '
          f'{fastest["lego"] / fastest["stock"]:.3f}  memory '
          f'{peak["lego"] / peak["stock"]:.3f}')
    print(f'ratio stock2/stock (fastest, harness noise): time '
          f'{fastest["stock2"] / fastest["stock"]:.3f}  memory '
          f'{peak["stock2"] / peak["stock"]:.3f}')


if __name__ == '__main__':
    main()
