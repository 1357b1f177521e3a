"""Summary maths, the Markdown report and the plot of the GPPF experiment.

Input: the runs' records (``gppf_experiment_exec.execute``). Every cell is
the mean ± sample std (n - 1) over seeds; a paired comparison takes, per
seed, the difference of two arms' values on the same task and seed.
"""
import math
import os
import os.path as osp
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    'mean_std', 'fmt_stat', 'arm_values', 'paired', 'machine', 'git_state',
    'plot', 'TRANSFER'
]

TRANSFER = 'trees_det'
LABELS = {
    'single': '(a) single-task, dense ResNet-18',
    'dense': '(b) SIMT, dense ResNet-18 (hard sharing)',
    'dense_tasknorm': '(b2) SIMT, lego N=k (dense + per-task norms)',
    'gppf': '(c) GPPF, lego N=4 k=2, routes learned',
    'gppf_fixed': '(d) GPPF, random fixed routes',
    'gppf_lownoise': '(c2) GPPF, routes learned, noise on the logits\' scale',
    'gppf_nobalance': '(c3) as (c2), no balance loss',
    'scratch': 'from scratch',
}


def mean_std(values: Sequence[float]) -> Tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0, 1
    var = sum((v - mean)**2 for v in values) / (n - 1)
    return mean, math.sqrt(var), n


def _digits(metric: str) -> int:
    return 3 if 'coco' in metric else 2


def fmt_stat(values: Sequence[float],
             digits: int = 3,
             signed: bool = False) -> str:
    """``'0.632 ± 0.004'``; one value: ``'0.632 (n=1)'``; none: ``'—'``."""
    mean, std, n = mean_std(values)
    if n == 0:
        return '—'
    sign = '+' if signed else ''
    if n == 1:
        return f'{mean:{sign}.{digits}f} (n=1)'
    return f'{mean:{sign}.{digits}f} ± {std:.{digits}f}'


def arm_values(records: Dict[str, dict],
               arm: str,
               task: str,
               kind: str = 'pretrain',
               key: Optional[str] = None) -> Dict[int, float]:
    """``{seed: value}`` of ``task``'s primary metric (or of the logged
    metric ``key``) for ``arm``."""
    out = {}
    for rec in records.values():
        if rec['kind'] != kind or rec['arm'] != arm \
                or task not in rec['primary']:
            continue
        value = rec['primary'][task] if key is None else \
            rec['metrics'].get(key)
        if value is not None:
            out[rec['seed']] = float(value)
    return out


def paired(a: Dict[int, float], b: Dict[int,
                                        float]) -> Tuple[List[float], int]:
    """Per-seed differences ``a - b`` (seeds in both) and the number of
    seeds where ``a`` is higher."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    return diffs, sum(d > 0 for d in diffs)


def machine() -> str:
    """CPU model (``/proc/cpuinfo``) and core count."""
    model = 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return f'{model}, {os.cpu_count()} cores'


def git_state(repo: str) -> str:
    """Short commit, and whether the tree had uncommitted changes."""
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                                cwd=repo,
                                capture_output=True,
                                text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '-uno'],
                               cwd=repo,
                               capture_output=True,
                               text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown commit'
    return commit + (' with uncommitted changes' if dirty else '')


def plot(path: str,
         records: Dict[str, dict],
         tasks: Sequence[str],
         arms: Sequence[str],
         metric_names: Dict[str, str],
         transfer_arms: Optional[Sequence[str]] = None) -> None:
    """One panel per task (and the transfer task): a bar per arm at its mean,
    the std as an error bar, every seed as a dot."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [(t, 'pretrain', list(arms)) for t in tasks]
    if transfer_arms:
        panels.append((TRANSFER, 'transfer', list(transfer_arms)))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    order = list(LABELS)
    for ax, (task, kind, names) in zip(axes[0], panels):
        for i, arm in enumerate(names):
            vals = arm_values(records, arm, task, kind)
            mean, std, n = mean_std(list(vals.values()))
            if n == 0:
                continue
            color = colors[order.index(arm) % len(colors)]
            ax.bar(i, mean, yerr=std, color=color, alpha=0.6, capsize=3)
            ax.plot([i] * n, list(vals.values()), 'k.', ms=4)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha='right', fontsize=7)
        title = task if kind == 'pretrain' else f'{task} (transfer)'
        ax.set_title(f'{title}\n{metric_names.get(task, "")}', fontsize=8)
        ax.tick_params(axis='y', labelsize=7)
    fig.suptitle(
        'GPPF experiment: mean ± std over seeds (dots: seeds)', fontsize=9)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
