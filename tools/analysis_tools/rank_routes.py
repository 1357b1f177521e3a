"""Rank a GPPF checkpoint's task routes as starting points for a new task.

For each pre-training task of the checkpoint, the downstream config's model
is built with a lego backbone that routes the new task along that task's
route (route copy: ``init_cfg.task_map``, docs/downstream.md) and fine-tuned
for a short probe on the first images of the config's training set: the same
images, batches and seed for every candidate (and for a backbone from
scratch, the reference). The lower the mean loss over the second half of the
probe, the better the start. Everything else is the config's own: dataset,
pipeline, head, optimiser, schedule (cut to the probe's length).

Usage:
    python tools/analysis_tools/rank_routes.py CONFIG CHECKPOINT \
        [--images 256] [--iters 40] [--seed 0] [--tasks A B] \
        [--out ranks.json] [--cfg-options ...]
"""
import argparse
import copy
import json
import os.path as osp
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, REPO)

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from projects.gppf.models import lego, unpack_state  # noqa: E402

SCRATCH = '(scratch)'


class _LossRecorder(Hook):
    """Keeps the total loss of every training iteration."""
    priority = 'LOWEST'

    def __init__(self) -> None:
        self.losses: List[float] = []

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None) -> None:
        self.losses.append(float(outputs['loss']))


def checkpoint_layout(checkpoint: str) -> dict:
    """The lego layout of the checkpoint's backbone (``backbone.``).

    Raises:
        ValueError: the checkpoint holds no lego backbone.
    """
    state = lego.read_state_dict(checkpoint, 'backbone.')
    layout = unpack_state(state.get('_extra_state', {})).get('lego_layout')
    if layout is None:
        raise ValueError(f'{checkpoint} holds no lego backbone (no '
                         'lego_layout under backbone.): give a GPPF, '
                         'LegoResNet or LegoViT checkpoint')
    return dict(layout)


def _innermost(dataset: dict) -> dict:
    """The dataset inside wrappers such as ``RepeatDataset``."""
    while 'dataset' in dataset:
        dataset = dataset['dataset']
    if 'datasets' in dataset:
        raise ValueError('the training set concatenates datasets; probe one '
                         'of them with --cfg-options train_dataloader.'
                         'dataset=...')
    return dataset


def probe_config(cfg: Config, checkpoint: str, layout: dict,
                 source: Optional[str], new_task: str, images: int, iters: int,
                 seed: int, work_dir: str) -> Config:
    """``cfg`` cut to a probe: ``iters`` iterations on the first ``images``
    training images, no evaluation and no checkpoint; its backbone routes
    ``new_task`` along ``source``'s route (``None``: from scratch)."""
    cfg = copy.deepcopy(cfg)
    if source is not None:
        backbone = cfg.model.backbone
        backbone.type = layout.get('backbone', 'LegoResNet')
        backbone.num_legos = layout['num_legos']
        backbone.num_active = layout['num_active']
        backbone.tasks = [new_task]
        backbone.task = new_task
        backbone.init_cfg = dict(
            type='Pretrained',
            prefix='backbone.',
            checkpoint=checkpoint,
            task_map={new_task: source})
    _innermost(cfg.train_dataloader.dataset).indices = images
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    cfg.train_cfg = dict(
        type='IterBasedTrainLoop', max_iters=iters, val_interval=iters + 1)
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator',
                'test_dataloader', 'test_cfg', 'test_evaluator'):
        cfg[key] = None
    # Iteration-based schedules run their first ``iters`` steps; epoch-based
    # ones would never step in an iteration loop: the base LR is used.
    cfg.param_scheduler = [
        s for s in (cfg.get('param_scheduler') or [])
        if s.get('by_epoch', True) is False
    ]
    cfg.default_hooks = dict(
        checkpoint=None, logger=dict(type='LoggerHook', interval=iters))
    cfg.custom_hooks = []
    cfg.randomness = dict(seed=seed)
    cfg.work_dir = work_dir
    # mmengine names the logger and visualizer instances after the
    # experiment (a per-second timestamp by default) and reuses an existing
    # instance of that name: two probes started within one second would share
    # the first one's, whose work dir is gone.
    cfg.experiment_name = f'rank_routes_{osp.basename(work_dir)}'
    if cfg.get('visualizer') is not None:
        cfg.visualizer.name = cfg.experiment_name
    cfg.load_from = None
    cfg.resume = False
    return cfg


def probe(cfg: Config) -> List[float]:
    """Train ``cfg`` (a probe config); the loss of every iteration."""
    runner = Runner.from_cfg(cfg)
    recorder = _LossRecorder()
    runner.register_hook(recorder)
    runner.train()
    return recorder.losses


def rank(cfg: Config,
         checkpoint: str,
         tasks: Sequence[str],
         images: int,
         iters: int,
         seed: int,
         scratch: bool = True) -> List[Dict]:
    """One row per candidate route (and scratch), best (lowest loss)
    first: ``source``, ``loss`` (mean of the probe's second half),
    ``first`` and ``last`` loss."""
    layout = checkpoint_layout(checkpoint)
    given = list(layout['tasks'])
    unknown = sorted(set(tasks) - set(given))
    if unknown:
        raise KeyError(f'{checkpoint} does not route the tasks {unknown}; '
                       f'its tasks are {given}')
    new_task = 'probe'
    while new_task in given:
        new_task += '_'
    rows = []
    candidates = list(tasks or given) + ([None] if scratch else [])
    for source in candidates:
        with tempfile.TemporaryDirectory() as work_dir:
            losses = probe(
                probe_config(cfg, checkpoint, layout, source, new_task, images,
                             iters, seed, work_dir))
        half = losses[len(losses) // 2:]
        rows.append(
            dict(
                source=SCRATCH if source is None else source,
                loss=float(np.mean(half)),
                first=losses[0],
                last=losses[-1]))
    return sorted(rows, key=lambda r: r['loss'])


def table(rows: Sequence[Dict], images: int, iters: int) -> str:
    lines = [
        f'| rank | start | mean loss, iterations {iters // 2 + 1}-{iters} '
        f'| first | last |', '| --- | --- | --- | --- | --- |'
    ]
    for i, r in enumerate(rows, 1):
        lines.append(f'| {i} | {r["source"]} | {r["loss"]:.4f} | '
                     f'{r["first"]:.4f} | {r["last"]:.4f} |')
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='downstream (single-task) config')
    parser.add_argument('checkpoint', help='GPPF / lego checkpoint')
    parser.add_argument(
        '--tasks', nargs='+', default=[], help='candidates (default: all)')
    parser.add_argument('--images', type=int, default=256)
    parser.add_argument('--iters', type=int, default=40)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--no-scratch', action='store_true', help='skip the scratch probe')
    parser.add_argument('--out', help='write the rows as JSON')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)
    if args.images < 1 or args.iters < 2:
        parser.error('--images must be >= 1 and --iters >= 2')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    rows = rank(cfg, args.checkpoint, args.tasks, args.images, args.iters,
                args.seed, not args.no_scratch)
    print(table(rows, args.images, args.iters))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(
                dict(
                    config=args.config,
                    checkpoint=args.checkpoint,
                    images=args.images,
                    iters=args.iters,
                    seed=args.seed,
                    rows=rows),
                f,
                indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
