"""Measured transfer: fine-tune held-out tasks from a GPPF checkpoint.

For each benchmark (a stock single-task config), each way into it and each
seed, one ``tools/train.py`` run:

- ``scratch``: the config as is (random backbone);
- ``export``: the stock backbone loads the source task's sub-network,
  exported with ``lego2resnet.py`` (``CheckedPretrained``: a checkpoint
  that does not fit stops the run);
- ``copy``: the backbone is a ``LegoResNet`` that routes the benchmark's task
  along the source task's route (``init_cfg.task_map``; docs/downstream.md);
- ``search``: ``copy``, then a ``RouteSearchHook`` searches the route for the
  first ``--search-share`` of the schedule with the units frozen.

Seed ``i`` fine-tunes from the ``i``-th checkpoint of ``--checkpoints`` (one
checkpoint serves every seed if only one is given). Runs are recorded and
resumed like the GPPF experiment's (``gppf_experiment_exec``); the table of
results replaces the section between the markers of ``--doc``.

Example::

    python tools/analysis_tools/downstream_transfer.py \\
        --checkpoints work_dirs/gppf_experiment/runs/gppf-s{0,1,2}/iter_400.pth
"""
import argparse
import os
import os.path as osp
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tools.analysis_tools import gppf_experiment_exec as ex  # noqa: E402
from tools.analysis_tools.gppf_experiment import config_sha  # noqa: E402
from tools.analysis_tools.gppf_experiment_plan import Run  # noqa: E402
from tools.analysis_tools.rank_routes import checkpoint_layout  # noqa: E402

#: name -> config, source task (a pre-training task), metric, iterations
BENCHMARKS = {
    'trees_det':
    dict(
        config='configs/gppf_experiment/'
        'fcos_r18-b32_fpn_1xb8-150i_trees-det.py',
        source='mnist_det',
        metric='coco/bbox_mAP',
        iters=150),
    'digits_cls':
    dict(
        config='configs/gppf_experiment/resnet18-b32_1xb32-200i_digits-cls.py',
        source='fmnist_cls',
        metric='accuracy/top1',
        iters=200),
}
WAYS = ('scratch', 'export', 'copy', 'search')
BEGIN, END = '<!-- transfer:begin -->', '<!-- transfer:end -->'


def _derived_config(path: str, base: str, backbone: dict,
                    search_iters: Optional[int]) -> str:
    """A config file inheriting ``base`` with ``backbone`` merged into the
    model's (and a ``RouteSearchHook`` when ``search_iters``)."""
    lines = [
        '# Written by tools/analysis_tools/downstream_transfer.py',
        f'_base_ = [{osp.join(REPO, base)!r}]',
        f'model = dict(backbone={backbone!r})',
        '# DDP: the units off the route get no gradient',
        'find_unused_parameters = True',
    ]
    if search_iters:
        lines.append(f"custom_hooks = [dict(type='RouteSearchHook', "
                     f'search_iters={search_iters})]')
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path


def plan(benchmarks: Sequence[str], ways: Sequence[str], seeds: Sequence[int],
         checkpoints: Sequence[str], work_dir: str, search_share: float,
         sources: Dict[str, str]) -> List[Run]:
    """Every run of the measurement."""
    runs = []
    for name in benchmarks:
        bench = BENCHMARKS[name]
        source = sources.get(name, bench['source'])
        for i, seed in enumerate(seeds):
            ckpt = checkpoints[i % len(checkpoints)]
            layout = checkpoint_layout(ckpt)
            if source not in layout['tasks']:
                raise KeyError(f'{ckpt} does not route {source!r}; its tasks '
                               f'are {layout["tasks"]}')
            stamp = os.stat(ckpt)
            source_id = f'{osp.abspath(ckpt)}:{stamp.st_size}:' \
                        f'{int(stamp.st_mtime)}'
            for way in ways:
                run_name = f'{name}-{way}-s{seed}'
                config, export = bench['config'], None
                options = {'randomness.seed': seed}
                if way == 'export':
                    out = osp.join(work_dir, 'exports',
                                   f'{source}-s{seed}.pth')
                    export = (ckpt, source, out)
                    options.update({
                        # fails, naming the fix, if the export does not fit
                        'model.backbone.init_cfg.type': 'CheckedPretrained',
                        'model.backbone.init_cfg.prefix': 'backbone.',
                        'model.backbone.init_cfg.checkpoint': out
                    })
                elif way in ('copy', 'search'):
                    backbone = dict(
                        type=layout.get('backbone', 'LegoResNet'),
                        num_legos=layout['num_legos'],
                        num_active=layout['num_active'],
                        tasks=[name],
                        task=name,
                        init_cfg=dict(
                            type='Pretrained',
                            prefix='backbone.',
                            checkpoint=osp.abspath(ckpt),
                            task_map={name: source}))
                    search = max(1, round(bench['iters'] * search_share)) \
                        if way == 'search' else None
                    config = _derived_config(
                        osp.join(work_dir, 'configs', f'{run_name}.py'),
                        bench['config'], backbone, search)
                runs.append(
                    Run(name=run_name,
                        kind='transfer',
                        arm=way,
                        seed=seed,
                        tasks=(name, ),
                        config=config,
                        options=options,
                        iters=bench['iters'],
                        metrics={name: bench['metric']},
                        export=export,
                        config_sha=config_sha(config),
                        source_id=source_id if way != 'scratch' else ''))
    return runs


def _fmt(values: Sequence[float], scale: float) -> str:
    v = np.asarray(values) * scale
    return f'{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:.2f}'


def early_loss(run_dir: str, after: int = 25) -> Optional[Tuple[int, float]]:
    """The first logged ``(iteration, training loss)`` of a run at or after
    iteration ``after`` (the configs log the mean of every 25 iterations).
    """
    curve = [c for c in ex.read_loss_curve(run_dir) if c[0] >= after]
    return curve[0] if curve else None


def report(runs: Sequence[Run], records: Dict[str, dict], command: str,
           sources: Dict[str, str], checkpoints: Sequence[str], threads: int,
           jobs: int) -> str:
    """The Markdown section: set-up, one table per benchmark (final
    metric per seed and paired with scratch; the first logged training
    loss, from ``<run>/early`` of each record)."""
    lines = [
        BEGIN, '', f'Command: `{command}`', '',
        f'Machine: {os.cpu_count()}-core CPU, {threads} thread(s) per run, '
        f'{jobs} run(s) at a time; {time.strftime("%Y-%m-%d")}. Pre-trained '
        f'checkpoints (seed i uses the i-th): ' +
        ', '.join(f'`{c}`' for c in checkpoints) + '.', ''
    ]
    by_bench: Dict[str, List[Run]] = {}
    for run in runs:
        by_bench.setdefault(run.tasks[0], []).append(run)
    for name, bench_runs in by_bench.items():
        bench = BENCHMARKS[name]
        scale = 100.0 if bench['metric'].startswith('coco/') else 1.0
        unit = 'bbox mAP x 100' if scale == 100 else bench['metric']
        seeds = sorted({r.seed for r in bench_runs})
        lines += [
            f'**{name}** ({bench["iters"]} iterations, `{bench["config"]}`;'
            f' source task `{sources.get(name, bench["source"])}`), {unit}, '
            f'mean ± std over seeds {seeds}:', '',
            '| way | mean ± std | per seed | paired − scratch '
            '| training loss at iteration ' +
            str(_early_iter(records, bench_runs)) + ' |',
            '| --- | --- | --- | --- | --- |'
        ]
        scratch = {
            r.seed: records[r.name]['primary'][name]
            for r in bench_runs if r.arm == 'scratch' and r.name in records
        }
        for way in WAYS:
            got = {
                r.seed: records[r.name]['primary'][name]
                for r in bench_runs if r.arm == way and r.name in records
            }
            if not got:
                continue
            values = [got[s] for s in sorted(got)]
            paired = [got[s] - scratch[s] for s in sorted(got) if s in scratch]
            early = [
                records[r.name]['early'][1] for r in bench_runs
                if r.arm == way and records.get(r.name, {}).get('early')
            ]
            lines.append(
                f'| {way} | {_fmt(values, scale)} | ' +
                ', '.join(f'{v * scale:.2f}' for v in values) + ' | ' +
                (_fmt(paired, scale) if way != 'scratch' and paired else '') +
                f' | {_fmt(early, 1.0) if early else ""} |')
        lines.append('')
    lines.append(END)
    return '\n'.join(lines)


def _early_iter(records: Dict[str, dict], runs: Sequence[Run]) -> str:
    its = {
        records[r.name]['early'][0]
        for r in runs if records.get(r.name, {}).get('early')
    }
    return '/'.join(str(i) for i in sorted(its)) or '?'


def write_section(doc: str, section: str) -> None:
    """Replace the marked section of ``doc`` (append it if absent)."""
    text = open(doc).read() if osp.isfile(doc) else ''
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip('\n') + '\n\n' + section + '\n'
    with open(doc, 'w') as f:
        f.write(text)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--checkpoints', nargs='+', required=True)
    parser.add_argument(
        '--benchmarks',
        nargs='+',
        default=list(BENCHMARKS),
        choices=list(BENCHMARKS))
    parser.add_argument('--ways', nargs='+', default=list(WAYS), choices=WAYS)
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument(
        '--source',
        nargs='+',
        default=[],
        metavar='BENCHMARK=TASK',
        help='pre-training task a benchmark starts from')
    parser.add_argument('--search-share', type=float, default=0.2)
    parser.add_argument('--work-dir', default='work_dirs/downstream_transfer')
    parser.add_argument('--doc', default='docs/downstream.md')
    parser.add_argument('--jobs', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--dry-run', action='store_true')
    args = parser.parse_args(argv)
    try:
        args.sources = dict(s.split('=', 1) for s in args.source)
    except ValueError:
        parser.error('--source takes BENCHMARK=TASK')
    if not 0 < args.search_share < 1:
        parser.error('--search-share must be in (0, 1)')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)
    runs = plan(args.benchmarks, args.ways, args.seeds, args.checkpoints,
                args.work_dir, args.search_share, args.sources)
    todo = ex.pending_runs(args.work_dir, runs)
    done = [r.name for r in runs if r not in todo]
    print(f'{len(runs)} runs, {len(done)} already recorded')
    if args.dry_run:
        ex.print_plan(runs, done, args.work_dir)
        return 0
    if not ex.run_all('downstream_transfer', todo, done, args.work_dir,
                      args.jobs, args.threads, {}, lambda r: r.iters):
        return 1
    records = {}
    for run in runs:
        record = ex.load_record(args.work_dir, run)
        if record is not None:
            records[run.name] = dict(
                record, early=early_loss(run.run_dir(args.work_dir)))
    command = shlex.join(
        ['python', 'tools/analysis_tools/'
         'downstream_transfer.py'] +
        list(sys.argv[1:] if argv is None else argv))
    write_section(
        args.doc,
        report(runs, records, command, args.sources, args.checkpoints,
               args.threads, args.jobs))
    print(f'wrote {args.doc}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
