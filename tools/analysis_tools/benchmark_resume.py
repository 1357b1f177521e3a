"""Time from ``--resume`` to the first trained iteration, by iteration.

For each iteration ``N`` given, a checkpoint of the config's model at
iteration ``N`` is written (the weights of a 1-iteration run with ``meta.iter``
set to ``N``: a synthetic checkpoint) and a new Runner resumes from it in
this process. Printed per ``N``: the time from ``runner.train()`` to the end
of the first resumed iteration (building the loops and loaders, loading the
checkpoint, the index-level skip, the first batch and step), the same for a
fresh start (``N = 0``: the floor) and their difference (fastest of
``--rounds`` alternating rounds each), and, as the baseline
measured in the same process, the time mmengine's loop would spend
redrawing and decoding ``N`` batches of every task (timed on
``--baseline-batches`` batches, scaled to ``N``). Run from the repository
root::

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
import projects.gppf  # noqa: E402,F401


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
    cfg.experiment_name = f'benchmark_resume_{time.time_ns()}'
    if 'visualizer' in cfg:  # a named visualizer is a process singleton
        cfg.visualizer.name = cfg.experiment_name
    cfg.default_hooks.checkpoint = dict(
        type='SafeCheckpointHook',
        by_epoch=False,
        interval=10**9,
        save_last=False)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    runner = Runner.from_cfg(cfg)
    runner.register_hook(_FirstIter())
    return runner


def _first_iteration(runner: Runner) -> float:
    """Seconds from ``runner.train()`` to the end of its first iteration."""
    start = time.perf_counter()
    runner.train()
    hook = next(h for h in runner.hooks if isinstance(h, _FirstIter))
    return hook.done - start


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
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument(
        '--num-workers',
        type=int,
        default=None,
        help="every task's training dataloader workers")
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    if args.num_workers is not None:
        for loader in cfg.train_dataloader.values():
            loader.num_workers = args.num_workers
            loader.persistent_workers = args.num_workers > 0
    print(f'config: {args.config}, num_workers: '
          f'{[ld.num_workers for ld in cfg.train_dataloader.values()]}')
    print(f'fastest of {args.rounds} alternating rounds')
    print('| resumed at | to first iteration (s) | fresh start (s) | '
          'resume cost (s) | stock replay of the skipped batches (s) |')
    print('| --- | --- | --- | --- | --- |')
    for n in args.iters:
        cfg = copy.deepcopy(cfg)
        cfg.train_cfg.max_iters = n + 10  # room for the resumed iteration
        with tempfile.TemporaryDirectory() as work_dir:
            _checkpoint(cfg, work_dir, n)
            fresh, resumed = [], []
            for _ in range(args.rounds):
                with tempfile.TemporaryDirectory() as other:
                    fresh.append(_first_iteration(_runner(cfg, other, False)))
                resumed.append(_first_iteration(_runner(cfg, work_dir, True)))
            # mmengine's loop decodes every skipped batch of every task
            batches = iter(_runner(cfg, work_dir, False).train_loop.dataloader)
            begin = time.perf_counter()
            for _ in range(args.baseline_batches):
                next(batches)
            replay = (time.perf_counter() - begin) / args.baseline_batches * n
        print(f'| {n} | {min(resumed):.2f} | {min(fresh):.2f} | '
              f'{min(resumed) - min(fresh):.2f} | {replay:.1f} |')


if __name__ == '__main__':
    main()
