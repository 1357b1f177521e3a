"""Evaluate a GPPF checkpoint on every task (SIMTTestLoop).

The command line of mmdet's ``tools/test.py``::

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out PREFIX]
        [--cfg-options k=v ...] [--launcher {none,pytorch,slurm,mpi}]

Metrics come out per task (``<task>/<metric>``) with a per-task table.
``--out results.pkl`` dumps each task's predictions to
``results_<task>.pkl``.
"""
import argparse
import os
import os.path as osp
import sys

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.evaluator import DumpResults  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) a GPPF model on every task')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir', help='the directory to save the evaluation metrics')
    parser.add_argument(
        '--out',
        type=str,
        help='dump predictions: X.pkl writes X_<task>.pkl per task')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value pairs')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    from projects.gppf.engine import check_simt_cfg
    check_simt_cfg(cfg)

    from projects.gppf.utils import init_dist_env
    init_dist_env(cfg)  # gloo on CPU; mmengine's init_dist needs CUDA
    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out must be a .pkl file')
        stem, ext = osp.splitext(args.out)
        for task, evaluator in runner.test_evaluator.items():
            evaluator.metrics.append(
                DumpResults(out_file_path=f'{stem}_{task}{ext}'))
    metrics = runner.test()
    return metrics


if __name__ == '__main__':
    main()
