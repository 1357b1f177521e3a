"""The runs of the GPPF experiment: arms, configs, schedules, commands.

Every run is ``tools/train.py CONFIG --work-dir DIR --cfg-options ...``; this
module decides CONFIG and the options of each run, so that a run is fully
named by its command (plus a hash of its resolved config).

Arms (pre-training, every task sees the same iterations and batches):

* ``single``: one run per task, that task alone on a stock dense ResNet;
* ``dense``: SIMT, one stock dense ResNet shared by all tasks;
* ``dense_tasknorm``: SIMT, the lego config with ``num_legos = num_active``
  (every task uses every unit), so it differs from ``dense`` only by the lego
  backbone's per-task norm statistics;
* ``gppf``: SIMT, the lego config as is (routes learned);
* ``gppf_fixed``: the same with every route frozen at its random initial
  value from iteration 0 (``TaskRouterHook`` ``warmup_iters=0,
  freeze_iter=0``);
* ``gppf_lownoise`` (not run by default): ``gppf`` with the routing noise
  on the scale of the router's logits (std ``LOW_NOISE`` annealed to 0
  instead of 1 to 0), so routes are chosen by the logits, not redrawn by
  the noise every iteration;
* ``gppf_nobalance`` (not run by default): ``gppf_lownoise`` without the
  router's balance loss (``model.backbone.router.balance_weight=0``), so
  routes move only by the gates' gradients.

Transfer: the held-out detection task fine-tuned from each arm's backbone
(lego arms: the exported sub-network of the source task) and from scratch.
"""
import copy
import hashlib
import json
import os.path as osp
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = [
    'ARMS', 'DEFAULT_ARMS', 'LEGO_ARMS', 'LOW_NOISE', 'Run', 'Settings',
    'config_tasks', 'derive_config', 'schedule_options', 'plan_runs',
    'primary_metric', 'option_args'
]

ARMS = ('single', 'dense', 'dense_tasknorm', 'gppf', 'gppf_fixed',
        'gppf_lownoise', 'gppf_nobalance')
DEFAULT_ARMS = ARMS[:5]
LEGO_ARMS = ('dense_tasknorm', 'gppf', 'gppf_fixed', 'gppf_lownoise',
             'gppf_nobalance')
# Routing-noise std of arm gppf_lownoise: the scale of the router's logits
# (initial std 0.01; after 400 demo iterations they span about 0.08 per task
# and layer, docs/experiments.md).
LOW_NOISE = 0.02
SCRATCH = 'scratch'
TRANSFER_TASK = 'trees_det'
# Per-task dicts of a GPPF config (model.* and top level).
_TASK_KEYED = ('train_dataloader', 'val_dataloader', 'test_dataloader',
               'val_evaluator', 'test_evaluator')
# Keys the tool sets itself; user --cfg-options may not touch them.
MANAGED = ('train_cfg.max_iters', 'train_cfg.val_interval', 'randomness',
           'param_scheduler', 'default_hooks.checkpoint', 'custom_hooks')
# The stock metric reported per evaluator type (mmdet/mmseg/mmpretrain).
_PRIMARY = {
    'CocoMetric': 'coco/bbox_mAP',
    'IoUMetric': 'mIoU',
    'Accuracy': 'accuracy/top1'
}


@dataclass
class Settings:
    """What the user asked for (validated by ``gppf_experiment.check``)."""
    config: str
    dense_config: str
    transfer_config: str
    work_dir: str
    tasks: Tuple[str, ...]
    arms: Tuple[str, ...]
    seeds: Tuple[int, ...]
    iters: int
    transfer_iters: int
    transfer: bool = True
    transfer_source: str = 'mnist_det'
    val_size: int = 0
    jobs: int = 2
    threads: int = 1
    cfg_options: Dict[str, Any] = field(default_factory=dict)
    transfer_cfg_options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """One training run (a subprocess of ``tools/train.py``).

    Attributes:
        name: Unique name, also its directory under ``<work_dir>/runs``.
        kind: ``'pretrain'`` or ``'transfer'``.
        arm: The arm (pre-training) or the backbone's source arm (transfer,
            ``'scratch'`` included).
        seed: ``randomness.seed`` (and the router's seed for lego arms).
        tasks: Tasks it trains and evaluates.
        config: Config file passed to ``tools/train.py``.
        options: ``--cfg-options`` as a dict.
        iters: Training iterations.
        metrics: Per task, the stock metric key in the logs.
        source: Name of the pre-training run whose backbone it loads.
        export: ``(checkpoint, task, out)``, the arguments of
            ``lego2resnet.py``: the lego sub-network of ``task`` of the
            source run's final checkpoint, written to ``out``.
        config_sha: Hash of the resolved config.
        source_id: Identity of the source run (a rerun source invalidates
            the transfer runs from it).
    """
    name: str
    kind: str
    arm: str
    seed: int
    tasks: Tuple[str, ...]
    config: str
    options: Dict[str, Any]
    iters: int
    metrics: Dict[str, str]
    source: Optional[str] = None
    export: Optional[Tuple[str, str, str]] = None
    config_sha: str = ''
    source_id: str = ''

    def run_dir(self, work_dir: str) -> str:
        return osp.join(work_dir, 'runs', self.name)

    def checkpoint(self, work_dir: str) -> str:
        return osp.join(self.run_dir(work_dir), f'iter_{self.iters}.pth')

    def command(self, work_dir: str, python: str = 'python') -> List[str]:
        return [
            python, 'tools/train.py', self.config, '--work-dir',
            self.run_dir(work_dir), '--cfg-options'
        ] + option_args(self.options)

    def identity(self, work_dir: str) -> str:
        """What makes a finished record reusable: command and config."""
        text = json.dumps(
            [self.command(work_dir), self.config_sha, self.source_id])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def option_args(options: Dict[str, Any]) -> List[str]:
    """``{'a.b': 1}`` -> ``['a.b=1']`` as mmengine's ``DictAction`` reads."""

    def fmt(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return '[' + ','.join(fmt(v) for v in value) + ']'
        return str(value)

    return [f'{key}={fmt(value)}' for key, value in options.items()]


def config_tasks(cfg) -> List[str]:
    """The task names of a GPPF config (``model.tasks``)."""
    tasks = cfg.get('model', {}).get('tasks')
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError('not a GPPF config: it has no model.tasks dict')
    return list(tasks)


def primary_metric(evaluator: dict) -> str:
    """The stock metric key of an evaluator config (no task prefix)."""
    kind = str(evaluator.get('type', '')).split('.')[-1]
    if kind not in _PRIMARY:
        raise ValueError(f'no primary metric known for evaluator {kind!r} '
                         f'(known: {", ".join(_PRIMARY)})')
    return _PRIMARY[kind]


def derive_config(cfg, tasks: Sequence[str], out: str) -> str:
    """Dump ``cfg`` restricted to ``tasks`` to ``out``; returns ``out``."""
    cfg = copy.deepcopy(cfg)
    keep = list(tasks)
    model = cfg.model
    model.tasks = {t: model.tasks[t] for t in keep}
    if model.get('loss_weights'):
        model.loss_weights = {t: model.loss_weights[t] for t in keep}
    pre = (model.get('data_preprocessor') or {}).get('preprocessors')
    if pre:
        model.data_preprocessor.preprocessors = {t: pre[t] for t in keep}
    for key in _TASK_KEYED:
        if isinstance(cfg.get(key), dict):
            cfg[key] = {t: cfg[key][t] for t in keep}
    cfg.dump(out)
    return out


def _scaler(old: int, new: int):
    """Maps an iteration of an ``old``-iteration schedule to ``new``."""

    def scale(x: int) -> int:
        if x <= 0:
            return 0
        if x >= old:
            return new
        return min(max(1, round(x * new / old)), new - 1)

    return scale


def schedule_options(cfg, iters: int) -> Dict[str, Any]:
    """Options that shrink or stretch ``cfg``'s schedule to ``iters``.

    Iteration-based boundaries (LR schedulers, the router hook's warm-up and
    freeze) keep their share of the run; one evaluation at the end; a
    checkpoint halfway (for ``--resume``) and at the end.
    """
    scale = _scaler(int(cfg.train_cfg.max_iters), iters)
    log = max(1, min(25, iters // 10))
    opts: Dict[str, Any] = {
        'train_cfg.max_iters': iters,
        'train_cfg.val_interval': iters,
        'default_hooks.checkpoint.interval': max(1, iters // 2),
        'default_hooks.checkpoint.max_keep_ckpts': 1,
        'default_hooks.logger.interval': log,
        'log_processor.window_size': log,
    }
    for i, sched in enumerate(cfg.get('param_scheduler') or []):
        if sched.get('by_epoch', True):
            raise ValueError(f'param_scheduler[{i}] is epoch-based; the '
                             'experiment needs iteration-based schedules')
        for key in ('begin', 'end'):
            if key in sched:
                opts[f'param_scheduler.{i}.{key}'] = scale(sched[key])
    for i, hook in enumerate(cfg.get('custom_hooks') or []):
        if hook.get('type') == 'TaskRouterHook':
            for key in ('warmup_iters', 'freeze_iter'):
                if hook.get(key) is not None:
                    opts[f'custom_hooks.{i}.{key}'] = scale(hook[key])
            opts[f'custom_hooks.{i}.log_interval'] = log
    return opts


def router_hook_index(cfg) -> int:
    """Position of the ``TaskRouterHook`` in ``cfg.custom_hooks``."""
    for i, hook in enumerate(cfg.get('custom_hooks') or []):
        if hook.get('type') == 'TaskRouterHook':
            return i
    raise ValueError('the lego config has no TaskRouterHook in custom_hooks;'
                     ' arms gppf_fixed, gppf_lownoise and gppf_nobalance set '
                     'routing '
                     'through it')


def _eval_options(cfg, tasks: Sequence[str], val_size: int,
                  subset_ann: Dict[str, str]) -> Dict[str, Any]:
    """Evaluate on the first ``val_size`` images of each task (0: all)."""
    opts: Dict[str, Any] = {}
    if not val_size:
        return opts
    for task in tasks:
        for split in ('val', 'test'):
            opts[f'{split}_dataloader.{task}.dataset.indices'] = val_size
            if task in subset_ann:
                opts[f'{split}_evaluator.{task}.ann_file'] = subset_ann[task]
    return opts


def plan_runs(s: Settings, cfgs: Dict[str, Any],
              subset_ann: Dict[str, str]) -> List[Run]:
    """All runs of the experiment, pre-training before transfer.

    Args:
        s: The settings.
        cfgs: ``'lego'``, ``'dense'``, ``'transfer'``: the loaded configs;
            ``'paths'``: the config file of ``'lego'``, ``'dense'`` and each
            ``'single:<task>'`` (derived); ``'sha'``: per config file, the
            hash of its resolved config.
        subset_ann: Per detection task, a COCO file of its first
            ``val_size`` val images (so ``CocoMetric`` scores the subset).
    """
    lego, dense, paths = cfgs['lego'], cfgs['dense'], cfgs['paths']
    metrics = {
        t: f'{t}/{primary_metric(lego.val_evaluator[t])}'
        for t in s.tasks
    }
    runs: List[Run] = []
    for seed in s.seeds:
        common = dict(s.cfg_options)
        common['randomness.seed'] = seed
        for arm in s.arms:
            if arm == 'single':
                for task in s.tasks:
                    opts = schedule_options(dense, s.iters)
                    opts.update(
                        _eval_options(dense, [task], s.val_size, subset_ann))
                    opts.update(common)
                    runs.append(
                        Run(f'single-{task}-s{seed}', 'pretrain', arm, seed,
                            (task, ), paths[f'single:{task}'], opts, s.iters,
                            {task: metrics[task]}))
                continue
            cfg = dense if arm == 'dense' else lego
            opts = schedule_options(cfg, s.iters)
            opts.update(_eval_options(cfg, s.tasks, s.val_size, subset_ann))
            if arm in LEGO_ARMS:
                opts['model.backbone.router.seed'] = seed
            if arm == 'dense_tasknorm':
                opts['model.backbone.num_legos'] = \
                    lego.model.backbone.get('num_active', 2)
            if arm == 'gppf_fixed':
                i = router_hook_index(lego)
                opts[f'custom_hooks.{i}.warmup_iters'] = 0
                opts[f'custom_hooks.{i}.freeze_iter'] = 0
            if arm in ('gppf_lownoise', 'gppf_nobalance'):
                i = router_hook_index(lego)
                opts[f'custom_hooks.{i}.noise_std'] = [LOW_NOISE, 0.0]
                opts['model.backbone.router.noise_std'] = LOW_NOISE
            if arm == 'gppf_nobalance':
                opts['model.backbone.router.balance_weight'] = 0.0
            opts.update(common)
            runs.append(
                Run(f'{arm}-s{seed}', 'pretrain', arm, seed, s.tasks,
                    paths['dense' if arm == 'dense' else 'lego'], opts,
                    s.iters, dict(metrics)))
    for run in runs:
        run.config_sha = cfgs['sha'][run.config]
    if s.transfer:
        runs += _transfer_runs(s, cfgs, runs)
    return runs


def _transfer_runs(s: Settings, cfgs: Dict[str, Any],
                   pretrain: List[Run]) -> List[Run]:
    """Fine-tuning runs of the transfer task from each source, per seed."""
    tcfg = cfgs['transfer']
    metric = {TRANSFER_TASK: primary_metric(tcfg.val_evaluator)}
    by_key = {(r.arm, r.seed, r.tasks): r for r in pretrain}
    runs = []
    for seed in s.seeds:
        for arm in s.arms + (SCRATCH, ):
            opts = schedule_options(tcfg, s.transfer_iters)
            source, export, source_id = None, None, ''
            if arm != SCRATCH:
                tasks = (s.transfer_source, ) if arm == 'single' else s.tasks
                src = by_key[(arm, seed, tasks)]
                source, ckpt = src.name, src.checkpoint(s.work_dir)
                source_id = src.identity(s.work_dir)
                if arm in LEGO_ARMS:
                    out = osp.join(s.work_dir, 'exports',
                                   f'{src.name}-{s.transfer_source}.pth')
                    export, ckpt = (ckpt, s.transfer_source, out), out
                opts.update({
                    'model.backbone.init_cfg.type': 'Pretrained',
                    'model.backbone.init_cfg.prefix': 'backbone.',
                    'model.backbone.init_cfg.checkpoint': ckpt
                })
            opts.update(s.transfer_cfg_options)
            opts['randomness.seed'] = seed
            runs.append(
                Run(f'{TRANSFER_TASK}-from-{arm}-s{seed}', 'transfer', arm,
                    seed, (TRANSFER_TASK, ), s.transfer_config, opts,
                    s.transfer_iters, metric, source, export,
                    cfgs['sha'][s.transfer_config], source_id))
    return runs
