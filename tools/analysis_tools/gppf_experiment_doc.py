"""The Markdown report of the GPPF experiment (``docs/experiments.md``).

Everything in it comes from the runs' records and the settings: the tables
(mean ± std over seeds), the paired differences, the router's own logs for
the lego arms, the cost of every run and the budget arithmetic.
"""
from typing import Dict, List, Sequence

from tools.analysis_tools.gppf_experiment_plan import SCRATCH, Run, Settings
from tools.analysis_tools.gppf_experiment_report import (LABELS, TRANSFER,
                                                         _digits, arm_values,
                                                         fmt_stat, paired)

__all__ = ['render']

# (arm, other arm) pairs of the paired comparison, where both were run.
COMPARE = tuple(
    ('gppf', other)
    for other in ('single', 'dense', 'dense_tasknorm', 'gppf_fixed')) + tuple(
        ('gppf_lownoise', other) for other in ('gppf', 'gppf_fixed')) + (
            ('gppf_nobalance', 'gppf_lownoise'),
            ('gppf_nobalance', 'gppf_fixed'))
TRANSFER_KEYS = ('coco/bbox_mAP', 'coco/bbox_mAP_50')


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> List[str]:
    out = [
        '| ' + ' | '.join(header) + ' |',
        '| ' + ' | '.join('---' for _ in header) + ' |'
    ]
    return out + ['| ' + ' | '.join(map(str, r)) + ' |' for r in rows]


def _results(s: Settings, records: Dict[str, dict],
             metrics: Dict[str, str]) -> List[str]:
    lines = [
        '## Pre-training tasks', '',
        f'Mean ± std over seeds {list(s.seeds)}; each task evaluated '
        'with its stock metric once, at the last iteration.', ''
    ]
    header = ['arm'] + [f'{t} {metrics[t]}' for t in s.tasks]
    rows = [[LABELS[a]] + [
        fmt_stat(
            list(arm_values(records, a, t).values()), _digits(metrics[t]))
        for t in s.tasks
    ] for a in s.arms]
    lines += _table(header, rows) + ['']
    if s.transfer:
        lines += [
            f'## Transfer: {TRANSFER}', '',
            f'{s.transfer_iters} iterations of the same FCOS from each '
            'pre-trained backbone (lego arms: the exported sub-network '
            f'of `{s.transfer_source}`; single: the `{s.transfer_source}`'
            ' run) and from scratch; same seeds.', ''
        ]
        rows = [[LABELS[a]] + [
            fmt_stat(
                list(
                    arm_values(records, a, TRANSFER, 'transfer',
                               key).values())) for key in TRANSFER_KEYS
        ] for a in s.arms + (SCRATCH, )]
        lines += _table(
            ['backbone'] + [f'{TRANSFER} {k}'
                            for k in TRANSFER_KEYS], rows) + ['']
    return lines


def _paired(s: Settings, records: Dict[str, dict],
            metrics: Dict[str, str]) -> List[str]:
    pairs = [(a, b) for a, b in COMPARE if a in s.arms and b in s.arms]
    if not pairs:
        return []
    cols = [(t, 'pretrain') for t in s.tasks]
    if s.transfer:
        cols.append((TRANSFER, 'transfer'))
    lines = [
        '## Paired comparison', '',
        'Per seed, a lego arm minus another arm on the same seed; mean ± '
        'std of the differences, and in how many seeds the first is '
        'higher. A mean difference within about one std of zero is not '
        'told apart from seed noise at this number of seeds.', ''
    ]
    rows = []
    for arm, other in pairs:
        row = [f'{arm} − {other}']
        for task, kind in cols:
            diffs, wins = paired(
                arm_values(records, arm, task, kind),
                arm_values(records, other, task, kind))
            cell = fmt_stat(diffs, _digits(metrics[task]), signed=True)
            cell = cell.replace(' (n=1)', '')
            row.append(
                f'{cell} ({wins}/{len(diffs)} higher)' if diffs else cell)
        rows.append(row)
    header = ['comparison'] + [f'{t} {metrics[t]}' for t, _ in cols]
    return lines + _table(header, rows) + ['']


def _losses(s: Settings, records: Dict[str, dict]) -> List[str]:
    lines = [
        '## What the project logs', '',
        'Training loss per task (sum of its loss terms) in the last '
        'logging window, mean ± std over seeds: a task that trains well but '
        'evaluates badly points at evaluation-time differences (norm '
        'statistics), not at optimisation.', ''
    ]
    rows = []
    for arm in s.arms:
        cells = []
        for task in s.tasks:
            vals = [
                r['losses'][task] for r in records.values()
                if r['kind'] == 'pretrain' and r['arm'] == arm
                and task in r.get('losses', {})
            ]
            cells.append(fmt_stat(vals, 3))
        rows.append([LABELS[arm]] + cells)
    return lines + _table(['arm'] + list(s.tasks), rows) + ['']


def _routes(s: Settings, records: Dict[str, dict], ctx: dict) -> List[str]:
    lego = [
        r for r in records.values()
        if r['kind'] == 'pretrain' and r.get('router')
    ]
    if not lego:
        return []
    lines = ctx['router_lines'] + [
        '', '`TaskRouterHook` scalars at the last logged iteration, read '
        'from the message hub saved in each final checkpoint. '
        '`router/<task>/unit<n>`: share '
        'of lego layers whose route uses unit n; `router/overlap`: mean '
        'over task pairs of the share of active units two tasks share '
        '(random routes: k/N on average; 1 when N = k). "moved": lego '
        'layers whose final route differs from the initial random '
        'route of that seed (0 for fixed routes).', ''
    ]
    rows = []
    for rec in sorted(lego, key=lambda r: (r['arm'], r['seed'])):
        router = rec['router']
        hist = router.get('overlap_history') or []
        trail = ', '.join(f'{v:.2f}@{i}'
                          for i, v in (hist[:1] + hist[len(hist) // 2:][:1] +
                                       hist[-1:]))
        shares = '; '.join(f'{t}: ' + ' '.join('—' if v is None else f'{v:.2f}'
                                               for v in sh)
                           for t, sh in router['unit_share'].items())
        moved = ', '.join(f'{t} {n}/{router["num_layers"]}'
                          for t, n in router['route_changed'].items())
        rows.append([
            rec['arm'], rec['seed'], shares,
            f'{router.get("overlap", float("nan")):.2f}', trail, moved
        ])
    header = [
        'arm', 'seed', 'unit share per task (unit 0..N-1)', 'overlap',
        'overlap over training (value@iter)', 'moved'
    ]
    return lines + _table(header, rows) + ['']


def _costs(s: Settings, runs: Sequence[Run], records: Dict[str, dict],
           ctx: dict) -> List[str]:
    by_arm: Dict[str, List[dict]] = {}
    for run in runs:
        rec = records.get(run.name)
        if rec is None:
            continue
        if run.kind == 'transfer':
            key = f'{TRANSFER} from ' + ('scratch' if run.arm == SCRATCH else
                                         'a backbone')
        elif run.arm == 'single':
            key = f'single {run.tasks[0]}'
        else:
            key = run.arm
        by_arm.setdefault(key, []).append(rec)
    rows = []
    for key, recs in by_arm.items():
        it = [
            r['iter_times'].get('time') for r in recs
            if r['iter_times'].get('time')
        ]
        rows.append([
            key,
            len(recs),
            fmt_stat(it, 3),
            fmt_stat([r['wall_s'] for r in recs], 0),
            fmt_stat([r['cpu_s'] for r in recs], 0)
        ])
    lines = [
        '## Cost and budget', '',
        f'{s.jobs} run(s) at a time, {s.threads} thread(s) each '
        '(`OMP_NUM_THREADS`). s/iter: mean logged iteration time '
        '(first logging window left out); wall and CPU seconds per '
        'run include start-up, evaluation and (transfer from lego arms) '
        'the export.', ''
    ]
    lines += _table(['runs', 'n', 's/iter', 'wall s per run', 'CPU s per run'],
                    rows) + ['']
    lines += ctx['budget_lines'] + ['']
    return lines


def render(s: Settings, runs: Sequence[Run], records: Dict[str, dict],
           metrics: Dict[str, str], ctx: dict) -> str:
    """The whole report as Markdown.

    Args:
        ctx: ``command``, ``date``, ``machine``, ``git``, ``wall_min`` (this
            invocation), ``reused`` (runs recorded before it), ``plot``
            (file name relative to the report), ``setup_lines``,
            ``router_lines`` and ``budget_lines`` (lists of Markdown
            lines).
    """
    missing = [r.name for r in runs if r.name not in records]
    lines = [
        '# GPPF experiment: does task-level sparsity pay?', '',
        '*Written by `tools/analysis_tools/gppf_experiment.py`; do not '
        'edit by hand, rerun it.*', '', f'- command: `{ctx["command"]}`',
        f'- date: {ctx["date"]}; code: {ctx["git"]}',
        f'- machine: {ctx["machine"]}',
        f'- wall time of this invocation: {ctx["wall_min"]:.1f} min '
        f'({ctx["reused"]} of {len(runs)} runs reused from earlier '
        'invocations)'
    ]
    if missing:
        lines.append(f'- **incomplete**: {len(missing)} runs without a '
                     f'result: {", ".join(missing)}')
    lines += [''] + ctx['setup_lines'] + ['', f'![results]({ctx["plot"]})', '']
    lines += _results(s, records, metrics)
    lines += _paired(s, records, metrics)
    lines += _losses(s, records)
    lines += _routes(s, records, ctx)
    lines += _costs(s, runs, records, ctx)
    lines += ['## Every run', '']
    rows = []
    for run in runs:
        rec = records.get(run.name)
        vals = '—' if rec is None else ', '.join(
            f'{t} {v:.4g}' for t, v in rec['primary'].items())
        rows.append([run.name, vals, (rec or {}).get('note', '')])
    lines += _table(['run', 'result', 'note'], rows)
    return '\n'.join(str(x) for x in lines) + '\n'
