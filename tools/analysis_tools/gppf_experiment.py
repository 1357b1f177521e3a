"""The GPPF experiment of issue 12: does task-level sparsity pay?

Pre-trains on the demo tasks with five arms (single-task, dense hard sharing,
dense with per-task norm statistics, GPPF with learned routes, GPPF with
random fixed routes), fine-tunes the held-out ``trees_det`` from each
backbone and from scratch, for several seeds, then writes a Markdown report
and a PNG plot. Every run is a ``tools/train.py`` subprocess; an interrupted
experiment resumes (finished runs are recorded and skipped).

Example::

    bash tools/run_experiment.sh                      # the defaults (~90 min)
    bash tools/run_experiment.sh --dry-run            # the plan and estimate
    bash tools/run_experiment.sh --seeds 1 --iters 6 --transfer-iters 6 \\
        --val-size 8 --work-dir /tmp/smoke --out /tmp/smoke/report.md \\
        --plot /tmp/smoke/report.png
"""
import argparse
import hashlib
import json
import os
import os.path as osp
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tools.analysis_tools import gppf_experiment_exec as ex  # noqa: E402
from tools.analysis_tools import gppf_experiment_plan as pl  # noqa: E402
from tools.analysis_tools.gppf_experiment_budget import (  # noqa: E402
    budget_lines, estimate_s)

DEFAULTS = dict(
    config='configs/gppf/gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py',
    dense_config='configs/gppf_experiment/'
    'gppf_r18_1xb8-8-32-1k_gppf-demo-dense.py',
    transfer_config='configs/gppf_experiment/'
    'fcos_r18-b32_fpn_1xb8-150i_trees-det.py',
    work_dir='work_dirs/gppf_experiment',
    out='docs/experiments.md',
    plot='docs/experiments.png',
    iters=400,
    transfer_iters=150,
    val_size=0,
)

_INT_ARGS = (
    ('--seeds', 3, 'number of seeds'),
    ('--first-seed', 0, 'seeds are first-seed, first-seed + 1, ...'),
    ('--iters', DEFAULTS['iters'], 'pre-training iterations of every run'),
    ('--transfer-iters', DEFAULTS['transfer_iters'],
     'fine-tuning iterations of every transfer run'),
    ('--val-size', DEFAULTS['val_size'],
     'evaluate pre-training tasks on their first N val images (0: all)'),
    ('--jobs', 2, 'runs at a time'),
    ('--threads', 1, 'torch threads per run (OMP_NUM_THREADS)'),
)


class ArgError(ValueError):
    """Arguments that cannot work; the message names the fix."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        '--config',
        default=DEFAULTS['config'],
        help='the lego SIMT config (arms c, d, b2)')
    p.add_argument(
        '--dense-config',
        default=DEFAULTS['dense_config'],
        help='the dense SIMT config (arms a, b)')
    p.add_argument(
        '--transfer-config',
        default=DEFAULTS['transfer_config'],
        help=f'the {pl.TRANSFER_TASK} fine-tuning config')
    p.add_argument(
        '--tasks',
        nargs='+',
        help='pre-training tasks (None: all of --config)')
    p.add_argument(
        '--arms',
        nargs='+',
        default=list(pl.DEFAULT_ARMS),
        help=f'arms, of {", ".join(pl.ARMS)} (default: '
        f'{" ".join(pl.DEFAULT_ARMS)})')
    for flag, default, text in _INT_ARGS:
        p.add_argument(flag, type=int, default=default, help=text)
    p.add_argument(
        '--no-transfer', action='store_true', help='pre-training arms only')
    p.add_argument(
        '--transfer-source',
        default='mnist_det',
        help='pre-training task whose sub-network (lego arms) or '
        'single-task run (arm single) the transfer starts from')
    p.add_argument('--work-dir', default=DEFAULTS['work_dir'])
    p.add_argument('--out', default=DEFAULTS['out'], help='Markdown report')
    p.add_argument('--plot', default=DEFAULTS['plot'], help='PNG plot')
    p.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        default={},
        help='extra options of every pre-training run')
    p.add_argument(
        '--transfer-cfg-options',
        nargs='+',
        action=DictAction,
        default={},
        help='extra options of every transfer run')
    p.add_argument(
        '--dry-run',
        action='store_true',
        help='print the runs and the time estimate; run nothing')
    p.add_argument(
        '--report-only',
        action='store_true',
        help='write the report from the recorded runs only')
    return p.parse_args(argv)


def _load(path: str, what: str):
    from mmengine.config import Config
    if not osp.isfile(osp.join(REPO, path)) and not osp.isfile(path):
        raise ArgError(f'{what} {path!r} does not exist; pass an existing '
                       f'file with --{what}')
    return Config.fromfile(
        path if osp.isfile(path) else osp.join(REPO, path),
        import_custom_modules=False)


def _positive(args: argparse.Namespace) -> None:
    unknown = [a for a in args.arms if a not in pl.ARMS]
    if unknown:
        raise ArgError(f'unknown arm(s) {", ".join(unknown)}; --arms takes '
                       f'some of: {", ".join(pl.ARMS)}')
    if len(set(args.arms)) != len(args.arms):
        raise ArgError(f'--arms repeats an arm: {args.arms}')
    if args.seeds < 1:
        raise ArgError(f'--seeds is the number of seeds and must be >= 1, '
                       f'got {args.seeds}')
    if args.first_seed < 0:
        raise ArgError(f'--first-seed must be >= 0, got {args.first_seed}')
    for flag in ('iters', 'transfer_iters'):
        value = getattr(args, flag)
        if value < 2:
            raise ArgError(
                f'--{flag.replace("_", "-")} {value} cannot fit the schedule '
                'and one evaluation: a run needs a warm-up iteration before '
                'its cosine phase and is evaluated at its last iteration; '
                'pass at least 2')
    for flag in ('jobs', 'threads'):
        if getattr(args, flag) < 1:
            raise ArgError(f'--{flag} must be >= 1, got {getattr(args, flag)}')
    if args.val_size < 0:
        raise ArgError(f'--val-size must be >= 1 (images per task) or 0 '
                       f'(all), got {args.val_size}')
    for flag in ('cfg_options', 'transfer_cfg_options'):
        for key in getattr(args, flag) or {}:
            if any(key == m or key.startswith(m + '.') for m in pl.MANAGED):
                raise ArgError(
                    f'--{flag.replace("_", "-")} {key}=... is set by the '
                    'experiment itself; use --iters, --transfer-iters, '
                    '--seeds or --first-seed instead')


def _data_root(loader: dict) -> str:
    return loader.get('dataset', {}).get('data_root', '')


def check(args: argparse.Namespace) -> Tuple[pl.Settings, Dict[str, Any]]:
    """Validate everything before any run; :class:`ArgError` names the fix.

    Returns:
        The settings and the loaded configs ``{'lego', 'dense',
        'transfer'}`` (``'transfer'`` is None with ``--no-transfer``).
    """
    _positive(args)
    lego = _load(args.config, 'config')
    dense = _load(args.dense_config, 'dense-config')
    known = pl.config_tasks(lego)
    tasks = tuple(args.tasks or known)
    for task in tasks:
        if task not in known:
            raise ArgError(f'task {task!r} is not in {args.config} (its '
                           f'tasks: {", ".join(known)}); fix --tasks')
    missing = [t for t in tasks if t not in pl.config_tasks(dense)]
    if missing:
        raise ArgError(f'--dense-config {args.dense_config} lacks task(s) '
                       f'{", ".join(missing)}; use a config with the same '
                       'tasks as --config')
    transfer = None
    if not args.no_transfer:
        if args.transfer_source not in tasks:
            raise ArgError(f'--transfer-source {args.transfer_source!r} is '
                           f'not a pre-training task ({", ".join(tasks)})')
        transfer = _load(args.transfer_config, 'transfer-config')
    roots = {t: _data_root(lego.train_dataloader[t]) for t in tasks}
    if transfer is not None:
        roots[pl.TRANSFER_TASK] = _data_root(transfer.train_dataloader)
    for task, root in roots.items():
        if root and not osp.isdir(osp.join(REPO, root)):
            raise ArgError(f'data of {task} not found at {root}; prepare it '
                           'with `bash tools/dataset_converters/'
                           'prepare_demo_data.sh`')
    if {'gppf_fixed', 'gppf_lownoise', 'gppf_nobalance'} & set(args.arms):
        pl.router_hook_index(lego)
    seeds = tuple(range(args.first_seed, args.first_seed + args.seeds))
    settings = pl.Settings(
        config=args.config,
        dense_config=args.dense_config,
        transfer_config=args.transfer_config,
        work_dir=args.work_dir,
        tasks=tasks,
        arms=tuple(a for a in pl.ARMS if a in args.arms),
        seeds=seeds,
        iters=args.iters,
        transfer_iters=args.transfer_iters,
        transfer=not args.no_transfer,
        transfer_source=args.transfer_source,
        val_size=args.val_size,
        jobs=args.jobs,
        threads=args.threads,
        cfg_options=dict(args.cfg_options or {}),
        transfer_cfg_options=dict(args.transfer_cfg_options or {}))
    return settings, dict(lego=lego, dense=dense, transfer=transfer)


def config_sha(path: str) -> str:
    """Hash of a config as resolved (``_base_`` files included)."""
    from mmengine.config import Config
    cfg = Config.fromfile(path, import_custom_modules=False)
    text = json.dumps(cfg.to_dict(), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _subset_ann(cfg, tasks: Sequence[str], size: int,
                out_dir: str) -> Dict[str, str]:
    """Per COCO-evaluated task, a file with its first ``size`` val images
    (the images ``dataset.indices=size`` keeps), so ``CocoMetric`` scores
    exactly the subset."""
    out = {}
    for task in tasks:
        evaluator = cfg.val_evaluator[task]
        if not size or 'ann_file' not in evaluator:
            continue
        with open(osp.join(REPO, evaluator['ann_file'])) as f:
            coco = json.load(f)
        images = coco['images'][:size]
        ids = {im['id'] for im in images}
        coco.update(
            images=images,
            annotations=[
                a for a in coco['annotations'] if a['image_id'] in ids
            ])
        path = osp.join(out_dir, f'{task}_val_first{size}.json')
        ex.write_json(path, coco)
        out[task] = path
    return out


def prepare(s: pl.Settings, cfgs: Dict[str, Any]) -> Dict[str, Any]:
    """Derived configs, their hashes and the evaluation subsets."""
    cfg_dir = osp.join(s.work_dir, 'configs')
    os.makedirs(cfg_dir, exist_ok=True)
    paths = {'lego': s.config, 'dense': s.dense_config}
    if set(s.tasks) != set(pl.config_tasks(cfgs['lego'])):
        for key in ('lego', 'dense'):
            paths[key] = pl.derive_config(cfgs[key], s.tasks,
                                          osp.join(cfg_dir, f'{key}.py'))
    if 'single' in s.arms:
        for task in s.tasks:
            paths[f'single:{task}'] = pl.derive_config(
                cfgs['dense'], [task], osp.join(cfg_dir, f'single_{task}.py'))
    files = set(
        paths.values()) | ({s.transfer_config} if s.transfer else set())
    sha = {p: config_sha(p) for p in files}
    subset = _subset_ann(cfgs['lego'], s.tasks, s.val_size,
                         osp.join(s.work_dir, 'eval_ann'))
    return dict(cfgs, paths=paths, sha=sha, subset=subset)


def _setup_lines(s: pl.Settings, runs: List[pl.Run]) -> List[str]:
    evald = (f'the first {s.val_size} val images'
             if s.val_size else 'all val images')
    fixed = next(r for r in runs if r.arm == 'gppf_fixed') if \
        'gppf_fixed' in s.arms else None
    lines = [
        '## Set-up',
        '',
        f'- pre-training tasks {", ".join(s.tasks)}: every arm trains each '
        f'task on the same batch size per iteration for {s.iters} '
        'iterations, with the optimiser of the demo config and its schedule '
        f'scaled to {s.iters} iterations; one evaluation at the end, on '
        f'{evald} of each task.',
        f'- seeds {list(s.seeds)}: `randomness.seed` (weights, data order) '
        'and, for the lego arms, `model.backbone.router.seed` (initial '
        'random routes and routing noise).',
        f'- (a) single: `{s.dense_config}` restricted to one task; (b) '
        f'dense: `{s.dense_config}` (stock mmdet ResNet-18, base 32 = the '
        'active width of the lego backbone with k=2); (b2) dense_tasknorm: '
        f'`{s.config}` with `model.backbone.num_legos=<num_active>` (N = '
        'k: every task uses every unit); (c) '
        f'gppf: `{s.config}` as is; (d) gppf_fixed: the same with the '
        'routes frozen at their random initial logits from iteration 0 '
        '(' +
        (' '.join(f'`{k}={v}`' for k, v in fixed.options.items() if k.endswith(
            ('warmup_iters', 'freeze_iter'))) if fixed else 'not run') + ').',
    ]
    if 'gppf_lownoise' in s.arms:
        lines.append(
            '- (c2) gppf_lownoise: (c) with the routing noise on the scale '
            f'of the router\'s logits: std {pl.LOW_NOISE} annealed to 0 '
            '(`TaskRouterHook` `noise_std`, `model.backbone.router.'
            'noise_std`) instead of 1 to 0.')
    if 'gppf_nobalance' in s.arms:
        lines.append('- (c3) gppf_nobalance: (c2) without the balance loss '
                     '(`model.backbone.router.balance_weight=0`).')
    if s.transfer:
        lines.append(
            f'- transfer: `{s.transfer_config}` for {s.transfer_iters} '
            'iterations; the backbone through `init_cfg=dict(type='
            "'Pretrained', prefix='backbone.', checkpoint=...)`: the "
            'pre-training checkpoint (dense arms) or the '
            '`tools/model_converters/lego2resnet.py` export of '
            f'`{s.transfer_source}` (lego arms).')
    lines.append(f'- exact commands: `{s.work_dir}/records/<run>.json`; '
                 f'logs: `{s.work_dir}/logs/`.')
    return lines


def _router_lines(s: pl.Settings, runs: List[pl.Run], lego) -> List[str]:
    """The router's settings in the lego config and the gppf runs."""
    hook = lego.custom_hooks[pl.router_hook_index(lego)]
    run = next((r for r in runs if r.arm == 'gppf'), None)
    sched = {} if run is None else {
        k.rsplit('.', 1)[1]: v
        for k, v in run.options.items() if k.startswith('custom_hooks.')
    }
    backbone = lego.model.backbone
    return [
        '## What the router logged', '',
        f'Lego backbone: N={backbone.get("num_legos", 4)} units per block, '
        f'k={backbone.get("num_active", 2)} active; router '
        f'`{dict(backbone.get("router") or {})}`; `TaskRouterHook` '
        f'noise_std {tuple(hook.get("noise_std") or ())}, '
        f'temperature {hook.get("temperature") or "fixed"}, warm-up with '
        'fixed routes '
        f'until iteration {sched.get("warmup_iters")}, routes frozen from '
        f'iteration {sched.get("freeze_iter")} (gppf, {s.iters} '
        'iterations). Route heatmaps: '
        f'`{s.work_dir}/runs/<run>/route_heatmaps/`.'
    ]


def report(s: pl.Settings, runs: List[pl.Run], out: str, plot_path: str,
           command: str, started: float, reused: int, lego) -> None:
    from tools.analysis_tools import gppf_experiment_doc as doc
    from tools.analysis_tools import gppf_experiment_report as rp
    records = {
        r.name: rec
        for r in runs
        for rec in [ex.load_record(s.work_dir, r)] if rec is not None
    }
    metrics = {}  # task -> its stock metric name
    for run in runs:
        for task, key in run.metrics.items():
            prefix = task + '/'
            metrics[task] = key[len(prefix):] if key.startswith(
                prefix) else key
    rp.plot(plot_path, records, s.tasks, s.arms, metrics,
            s.arms + (pl.SCRATCH, ) if s.transfer else None)
    ctx = dict(
        command=command,
        date=time.strftime('%Y-%m-%d %H:%M %Z'),
        machine=rp.machine(),
        git=rp.git_state(REPO),
        wall_min=(time.time() - started) / 60,
        reused=reused,
        plot=osp.relpath(plot_path, osp.dirname(osp.abspath(out))),
        setup_lines=_setup_lines(s, runs),
        router_lines=_router_lines(s, runs, lego),
        budget_lines=budget_lines(s, runs, records))
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
        f.write(doc.render(s, runs, records, metrics, ctx))
    print(f'wrote {out} and {plot_path}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.time()
    args = parse_args(argv)
    os.chdir(REPO)  # relative paths are relative to the repository
    try:
        s, cfgs = check(args)
    except (ArgError, ValueError, KeyError) as exc:
        print(f'gppf_experiment: error: {exc}', file=sys.stderr)
        return 2
    cfgs = prepare(s, cfgs)
    runs = pl.plan_runs(s, cfgs, cfgs['subset'])
    todo = ex.pending_runs(s.work_dir, runs)
    done = [r.name for r in runs if r not in todo]
    command = os.environ.get('GPPF_EXPERIMENT_CMD') or shlex.join(
        ['python', 'tools/analysis_tools/gppf_experiment.py'] +
        list(sys.argv[1:] if argv is None else argv))
    print(f'{len(runs)} runs, {len(runs) - len(todo)} already recorded; '
          f'estimate for the rest: {estimate_s(s, todo) / 60:.0f} min')
    if args.dry_run:
        ex.print_plan(runs, done, s.work_dir)
        return 0
    if not args.report_only and not ex.run_all(
            'gppf_experiment', todo, done, s.work_dir, s.jobs, s.threads,
            dict(cfgs['lego'].model.backbone.get('router') or {}),
            lambda r: estimate_s(s, [r])):
        return 1
    report(s, runs, args.out, args.plot, command, started, len(done),
           cfgs['lego'])
    return 0


if __name__ == '__main__':
    sys.exit(main())
