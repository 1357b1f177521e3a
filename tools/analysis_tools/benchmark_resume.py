"""Time from ``--resume`` to the first trained iteration, by iteration.

For each iteration ``N`` given, a checkpoint of the config's model at
iteration ``N`` is written (the weights of a 1-iteration run with ``meta.iter``
set to ``N``: a synthetic checkpoint) and a fresh Runner resumes from it in
this process; the figure is the time from ``runner.train()`` to the end of
the first resumed iteration (checkpoint loading, the index-level skip of
``N`` batches of every task, the first batch and its step), in the same
process as the baseline: the time the stock loop spends redrawing and
decoding ``N`` batches of every task (measured on a prefix, scaled to
``N``). Run from the repository root::

    python tools/analysis_tools/benchmark_resume.py \\
        configs/gppf/gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py \\
        --iters 100 1000 10000
"""
import argparse
import copy
import os.path as osp
import sys
import tempfile
import time

import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


class _FirstIter(Hook):
    """Stops training after the first resumed iteration."""

    priority = 'LOWEST'

    def __init__(self):
        self.done = None

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        self.done = time.perf_counter()
        runner.train_loop.stop_training = True


def _runner(cfg: Config, work_dir: str, resume: bool) -> Runner:
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = work_dir
    cfg.resume = resume
    cfg.log_level = 'WARNING'
    cfg.default_hooks.checkpoint = dict(
        type='SafeCheckpointHook', by_epoch=False, interval=10**9)
    cfg.custom_hooks = [h for h in cfg.get('custom_hooks', [])
                        ] + [dict(type=_FirstIter)]
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    return Runner.from_cfg(cfg)


def _checkpoint(cfg: Config, work_dir: str, iters: int) -> str:
    """A checkpoint whose meta says ``iters`` (weights after 1 step)."""
    runner = _runner(cfg, work_dir, resume=False)
    runner.train()
    path = osp.join(work_dir, f'iter_{iters}.pth')
    runner.save_checkpoint(work_dir, f'iter_{iters}.pth')
    ckpt = torch.load(path, weights_only=True)
    ckpt['meta']['iter'] = iters
    torch.save(ckpt, path)
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config')
    parser.add_argument(
        '--iters', type=int, nargs='+', default=[100, 1000, 10000])
    parser.add_argument(
        '--baseline-batches',
        type=int,
        default=20,
        help='batches redrawn to time the stock replay')
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    print(f'config: {args.config}')
    print('| resumed at | resume to first iteration (s) | '
          'stock replay of the skipped batches (s, extrapolated) | ratio |')
    print('| --- | --- | --- | --- |')
    for n in args.iters:
        with tempfile.TemporaryDirectory() as work_dir:
            _checkpoint(cfg, work_dir, n)
            runner = _runner(cfg, work_dir, resume=True)
            start = time.perf_counter()
            runner.train()
            hook = next(h for h in runner.hooks if isinstance(h, _FirstIter))
            ours = hook.done - start
            # the stock loop decodes every skipped batch of every task
            batches = iter(runner.train_loop.dataloader)
            begin = time.perf_counter()
            for _ in range(args.baseline_batches):
                next(batches)
            replay = (time.perf_counter() - begin) / args.baseline_batches * n
        print(f'| {n} | {ours:.2f} | {replay:.1f} | {replay / ours:.0f}x |')


if __name__ == '__main__':
    main()
