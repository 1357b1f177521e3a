"""Benchmark LegoResNet-50 (k of N units active) against the stock ResNet-50.

Forward + backward of the same batch, in one process: every round (``--iters``)
runs one step of each model (the stock ResNet, the LegoResNet and a second
stock ResNet, the baseline measured against itself), in an order that
rotates between rounds. The script prints the fastest and the median step
time and the peak memory of each, and the ratios of the fastest rounds
(lego / stock, and stock / stock: the harness's own noise). Peak memory: see
``_lego_benchmark.py``.

    python tools/analysis_tools/benchmark_lego_resnet.py --batch 16
    python tools/analysis_tools/benchmark_lego_resnet.py --device cuda \
        --batch 256 --amp bf16 --channels-last
"""
import argparse
import os.path as osp
import sys

import torch

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import _lego_benchmark as bench  # noqa: E402
from mmpretrain.models.backbones import ResNet  # noqa: E402

from projects.gppf import LegoResNet  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--depth', type=int, default=50)
    parser.add_argument(
        '--size', type=bench.image_size, default=(224, 224), help='S or HxW')
    parser.add_argument('--iters', type=int, default=10, help='rounds')
    parser.add_argument('--channels-last', action='store_true')
    bench.add_common_args(parser, batch=16, warmup=3)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = bench.setup(args)
    stock = ResNet(args.depth, out_indices=(0, 1, 2, 3))
    lego = LegoResNet(
        args.depth, num_legos=args.num_legos, num_active=args.num_active)
    fmt = (
        torch.channels_last if args.channels_last else torch.contiguous_format)
    x = torch.randn(args.batch, 3, *args.size, device=device)
    x = x.contiguous(memory_format=fmt)
    result = bench.compare(stock, lego, x, args.amp, args.iters, args.warmup,
                           fmt)
    bench.report(
        result, device, f'depth={args.depth} num_legos={args.num_legos} '
        f'num_active={args.num_active} batch={args.batch} '
        f'size={args.size[0]}x{args.size[1]} '
        f'amp={args.amp} channels_last={args.channels_last} '
        f'iters={args.iters}')
    print(f'active fraction of lego units '
          f'{args.num_active / args.num_legos:.2f}')


if __name__ == '__main__':
    main()
