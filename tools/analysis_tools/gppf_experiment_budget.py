"""Time estimate of the GPPF experiment and its budget arithmetic.

Reference costs, measured on the project's machine kind (2-core AMD EPYC,
shared with other jobs) on 2026-11-30 with the demo data and the demo config
as it stood (per-task norm statistics in progress, classification at 28 px):
80-iteration runs, 2 runs at a time with 1 thread each. Two gppf runs side
by side (1 thread each) took 107 s for both; one run with 2 threads took
75 s, i.e. 150 s for two: 2 runs x 1 thread is 1.4x the throughput, hence
the defaults ``--jobs 2 --threads 1``. Where other jobs shared the machine,
seconds per iteration are scaled by the run's CPU/wall ratio (1 thread: CPU
time is what the run costs on an idle core).

The estimate of a run is ``iterations x seconds per iteration + a fixed cost
per run`` (start-up, evaluation, checkpoints, export); of the experiment,
the sum over runs divided by the runs at a time.
"""
from typing import Dict, List, Sequence

from tools.analysis_tools.gppf_experiment_plan import (TRANSFER_TASK, Run,
                                                       Settings)

__all__ = ['REF_ITER_S', 'REF_RUN_S', 'REF_WHEN', 'estimate_s', 'budget_lines']

#: Seconds per training iteration, 1 thread, 2 runs at a time.
REF_ITER_S: Dict[str, float] = {
    'gppf': 0.90,
    'gppf_fixed': 0.90,
    'gppf_lownoise': 0.90,
    'gppf_nobalance': 0.90,
    'dense_tasknorm': 0.84,
    'dense': 0.78,
    'single:mnist_det': 0.48,
    'single:fmnist_seg': 0.27,
    'single:fmnist_cls': 0.17,
    TRANSFER_TASK: 0.77,  # 192 px, batch 8
}
#: Seconds per run besides its iterations (start-up, evaluation, saving).
REF_RUN_S: Dict[str, float] = {'pretrain': 28.0, 'transfer': 20.0}
REF_WHEN = 'measured 2026-11-30, see the docstring of ' \
    '`tools/analysis_tools/gppf_experiment_budget.py`'


def _iter_key(run: Run) -> str:
    if run.kind == 'transfer':
        return TRANSFER_TASK
    if run.arm == 'single':
        return f'single:{run.tasks[0]}'
    return run.arm


def _iter_s(run: Run) -> float:
    key = _iter_key(run)
    if key in REF_ITER_S:
        return REF_ITER_S[key]
    # a task the reference does not know: a third of a SIMT iteration
    return REF_ITER_S['gppf'] / 3


def run_estimate_s(run: Run) -> float:
    """Estimated wall seconds of one run."""
    return run.iters * _iter_s(run) + REF_RUN_S[run.kind]


def estimate_s(s: Settings, runs: Sequence[Run]) -> float:
    """Estimated wall seconds of ``runs`` on ``s.jobs`` workers."""
    return sum(run_estimate_s(r) for r in runs) / max(s.jobs, 1)


def budget_lines(s: Settings, runs: Sequence[Run],
                 records: Dict[str, dict]) -> List[str]:
    """The budget arithmetic of these settings, and what it cost."""
    groups: Dict[str, List[Run]] = {}
    for run in runs:
        groups.setdefault(_iter_key(run), []).append(run)
    terms = []
    for key, group in groups.items():
        iters = group[0].iters
        terms.append(f'{len(group)} x ({iters} x {_iter_s(group[0]):.2f} s '
                     f'+ {REF_RUN_S[group[0].kind]:.0f} s) [{key}]')
    total = estimate_s(s, runs)
    spent = [r for r in records.values() if 'wall_s' in r]
    lines = [
        f'Reference costs ({REF_WHEN}; 1 thread per run, 2 runs at a time): ' +
        ', '.join(f'{k} {v:.2f} s/iter' for k, v in REF_ITER_S.items()) +
        f'; {REF_RUN_S["pretrain"]:.0f} s (pre-training) and '
        f'{REF_RUN_S["transfer"]:.0f} s (transfer) per run for start-up, '
        'evaluation and saving.', '',
        'Estimate for these settings = (' + ' + '.join(terms) +
        f') / {s.jobs} runs at a time = **{total / 60:.1f} min**.'
    ]
    if spent:
        wall = sum(r['wall_s'] for r in spent)
        lines += [
            '',
            f'Measured: the {len(spent)} recorded runs took {wall / 60:.1f}'
            f' min of run time in all, i.e. {wall / 60 / max(s.jobs, 1):.1f} '
            f'min on {s.jobs} workers.'
        ]
    return lines
