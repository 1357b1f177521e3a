"""Benchmark LegoViT (k of N units active) against mmpretrain's ViT.

Forward + backward of the same batch, in one process: every round runs one
step of each model (the stock ViT, the LegoViT and a second stock ViT, the
baseline measured against itself), in an order that rotates between rounds.
Ratios compare the fastest rounds (shared machines make medians scatter);
the stock/stock ratio shows the harness's own noise. Peak memory: see
``_lego_benchmark.py``.

    python tools/analysis_tools/benchmark_lego_vit.py --arch base \
        --batch 4 --img-size 224 --rounds 20
    python tools/analysis_tools/benchmark_lego_vit.py --arch deit-small \
        --num-active 2 --rounds 3
"""
import argparse
import os.path as osp
import sys

import torch

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import _lego_benchmark as bench  # noqa: E402
from mmpretrain.models.backbones import VisionTransformer  # noqa: E402

from projects.gppf import LegoViT  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--arch', default='base', help='a VisionTransformer arch name')
    parser.add_argument('--patch-size', type=int, default=16)
    parser.add_argument(
        '--img-size',
        type=bench.image_size,
        default=(224, 224),
        help='S or HxW')
    parser.add_argument('--rounds', type=int, default=20)
    bench.add_common_args(parser, batch=4, warmup=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = bench.setup(args)
    common = dict(
        arch=args.arch, img_size=args.img_size, patch_size=args.patch_size)
    stock = VisionTransformer(**common)
    lego = LegoViT(
        num_legos=args.num_legos, num_active=args.num_active, **common)
    x = torch.randn(args.batch, 3, *args.img_size, device=device)
    result = bench.compare(stock, lego, x, args.amp, args.rounds, args.warmup)
    bench.report(
        result, device, f'arch={args.arch} num_legos={args.num_legos} '
        f'num_active={args.num_active} batch={args.batch} '
        f'img_size={args.img_size[0]}x{args.img_size[1]} amp={args.amp} '
        f'rounds={args.rounds}')


if __name__ == '__main__':
    main()
