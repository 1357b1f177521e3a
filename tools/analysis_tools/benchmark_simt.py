"""Benchmark one SIMT iteration against the same single-task iterations.

In one process, with the same model and the same batches (one per task from
the config's ``train_dataloader``):

* ``simt``: ``model.train_step({task: batch for every task})``, i.e. every
  task's forward and backward in turn and one optimizer step;
* ``single[task]``: ``model.train_step({task: batch})``, one task's
  iteration (its forward, backward and optimizer step).

Reported: median wall time of each (``time ratio = simt / sum(single)``,
goal <= 1.02) and peak memory allocated during each step (``memory ratio =
simt / max(single)``, goal <= 1.15; CUDA: ``max_memory_allocated``, CPU: the
allocator's running total recorded by the PyTorch profiler).

With ``--stock`` (a ``LegoResNet`` config), each task's stock model is
timed too: the task's stock head on mmseg's ``ResNet`` of the same arguments
(the lego sub-network's dense twin), built and stepped as a one-task GPPF
with its own optimizer. Reported: ``stock throughput ratio = sum(stock) /
simt``, the SIMT iteration's throughput as a fraction of the stock
single-task steps run back to back (issue goal on a GPU: >= 0.90).

With ``--synthetic task=BxHxW ...`` the batches are random images and
targets of those shapes (``_synthetic_batches.py``), so no dataset is read:
what a machine without the datasets (a lent GPU) needs.

Example::

    python tools/analysis_tools/benchmark_simt.py \
        configs/gppf/gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py --iters 10
    python tools/analysis_tools/benchmark_simt.py \
        configs/gppf/gppf_lego-r50_8xb2-2-32-90k_coco-ade20k-in1k.py \
        --stock --synthetic coco_det=2x800x1344 ade20k_seg=2x512x512 \
        in1k_cls=32x224x224
"""
import argparse
import copy
import json
import os.path as osp
import statistics
import sys
import time
from typing import Any, Callable, Dict, Mapping, Optional

import torch

try:  # imported as tools.analysis_tools.benchmark_simt
    from ._synthetic_batches import parse_shapes, synthetic_batch
except ImportError:  # run as a script
    from _synthetic_batches import parse_shapes, synthetic_batch

__all__ = [
    'peak_memory', 'time_call', 'benchmark', 'build_model',
    'stock_task_models', 'task_batches', 'synthetic_batches'
]


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it.

    Args:
        fn: The step to measure.
        device: ``cuda`` (``torch.cuda`` allocator statistics) or ``cpu``
            (allocation events of the PyTorch profiler, whose
            ``total_allocated`` is the CPU allocator's running total).

    Returns:
        int: Peak bytes.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        fn()
    peak, stack = 0, list(p.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and (node.extra_fields.device.type
                                                  == 'cpu'):
            peak = max(peak, node.extra_fields.total_allocated)
    return peak


def time_call(fn: Callable[[], Any], device: torch.device,
              iters: int) -> float:
    """Median seconds of ``iters`` calls of ``fn``."""
    times = []
    for _ in range(iters):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark(model: torch.nn.Module,
              batches: Mapping[str, Any],
              optim_wrapper,
              iters: int = 10,
              warmup: int = 2,
              stock: Optional[Mapping[str, tuple]] = None) -> Dict[str, Any]:
    """Time and peak memory of a SIMT iteration vs single-task ones.

    Args:
        model: A :class:`GPPF` in train mode on its device.
        batches: One dataloader batch per task.
        optim_wrapper: The optimizer wrapper (steps every iteration).
        iters: Timed repetitions (median). warmup: untimed ones first.
        stock: ``{task: (model, optim_wrapper)}``, a stock single-task
            model per task, timed on the same batch.

    Returns:
        dict: ``simt_s``, ``single_s`` (per task), ``time_ratio``,
        ``simt_peak``, ``single_peak`` (per task, bytes), ``memory_ratio``
        and ``grad_bytes`` (all gradient buffers: a SIMT step keeps the
        ones earlier tasks filled while later tasks run, which bounds its
        excess over the largest task); with ``stock``, also ``stock_s``
        (per task), ``sum_stock_s`` and ``stock_throughput_ratio``
        (``sum_stock_s / simt_s``).
    """
    device = model.data_preprocessor.device

    def step(net, wrapper, tasks):
        return lambda: net.train_step(
            {t: copy.deepcopy(batches[t])
             for t in tasks}, wrapper)

    tasks = list(batches)
    runs = {'simt': step(model, optim_wrapper, tasks)}
    runs.update({t: step(model, optim_wrapper, [t]) for t in tasks})
    for task, (net, wrapper) in (stock or {}).items():
        runs[f'stock:{task}'] = step(net, wrapper, [task])
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    # Interleave the repetitions so that drift hits every run alike.
    times: Dict[str, list] = {name: [] for name in runs}
    for _ in range(iters):
        for name, fn in runs.items():
            times[name].append(time_call(fn, device, 1))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    peaks = {name: peak_memory(fn, device) for name, fn in runs.items()}
    single_s = {t: median[t] for t in tasks}
    single_peak = {t: peaks[t] for t in tasks}
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                     if p.requires_grad)
    res = dict(
        grad_bytes=grad_bytes,
        device=str(device),
        iters=iters,
        simt_s=median['simt'],
        single_s=single_s,
        sum_single_s=sum(single_s.values()),
        time_ratio=median['simt'] / sum(single_s.values()),
        simt_peak=peaks['simt'],
        single_peak=single_peak,
        memory_ratio=peaks['simt'] / max(single_peak.values()))
    if stock:
        stock_s = {t: median[f'stock:{t}'] for t in stock}
        res.update(
            stock_s=stock_s,
            stock_peak={t: peaks[f'stock:{t}']
                        for t in stock},
            sum_stock_s=sum(stock_s.values()),
            stock_throughput_ratio=sum(stock_s.values()) / median['simt'])
    return res


def build_model(model_cfg, device: torch.device) -> torch.nn.Module:
    """Build and initialise ``model_cfg`` in train mode on ``device``
    (SyncBN reverted to BN off the GPU, where torch's needs CUDA)."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS
    model = MODELS.build(model_cfg)
    model.init_weights()
    if device.type != 'cuda':
        model = revert_sync_batchnorm(model)
    return model.to(device).train()


#: LegoResNet arguments that its stock twin (mmseg's ResNet) does not take.
_LEGO_ONLY = ('type', 'num_legos', 'num_active', 'tasks', 'task', 'router',
              'task_norm', 'init_cfg', 'pretrained')


def stock_task_models(cfg, device: torch.device,
                      optim_cfg: dict) -> Dict[str, tuple]:
    """Per task, the stock single-task model and its optimizer wrapper: a
    one-task GPPF whose backbone is mmseg's ``ResNet`` of the config's
    ``LegoResNet`` arguments (a dense ResNet of the lego sub-network's
    width), so the task's stock model runs under the same ``train_step``;
    ``optim_cfg`` builds each one's optimizer wrapper.

    Raises:
        ValueError: the config's backbone is not a ``LegoResNet``.
    """
    from mmengine.optim import build_optim_wrapper
    backbone = dict(cfg.model.backbone)
    if backbone.get('type') != 'LegoResNet':
        raise ValueError('--stock compares a LegoResNet with its stock twin; '
                         f'this config\'s backbone is {backbone.get("type")}')
    twin = dict(
        type='mmseg.ResNet',
        **{
            k: v
            for k, v in backbone.items() if k not in _LEGO_ONLY
        })
    # mmseg's stem defaults to 64 channels, LegoResNet's to base_channels.
    twin['stem_channels'] = (
        backbone.get('stem_channels') or backbone.get('base_channels', 64))
    out = {}
    for task in cfg.model.tasks:
        one = copy.deepcopy(cfg.model)
        one.backbone = twin
        one.tasks = {task: one.tasks[task]}
        if one.get('loss_weights'):
            one.loss_weights = {task: one.loss_weights[task]}
        preprocessors = (one.get('data_preprocessor')
                         or {}).get('preprocessors')
        if preprocessors:
            one.data_preprocessor.preprocessors = {task: preprocessors[task]}
        net = build_model(one, device)
        out[task] = (net, build_optim_wrapper(net, copy.deepcopy(optim_cfg)))
    return out


def task_batches(cfg, seed: int = 0) -> Dict[str, Any]:
    """First batch of every task's ``train_dataloader`` of a config."""
    from mmengine.runner import Runner

    from projects.gppf.engine.task_loaders import task_keys
    from projects.gppf.models.task_config import scope_of, with_scope
    out = {}
    for task in task_keys(cfg.train_dataloader, 'train_dataloader'):
        loader_cfg = copy.deepcopy(cfg.train_dataloader[task])
        loader_cfg['num_workers'] = 0
        loader_cfg.pop('persistent_workers', None)
        if scope_of(loader_cfg['dataset']):
            loader_cfg['dataset'] = with_scope(loader_cfg['dataset'], '')
        out[task] = next(iter(Runner.build_dataloader(loader_cfg, seed=seed)))
    return out


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', help='a GPPF config with train_dataloader')
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument(
        '--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument(
        '--amp', action='store_true', help='fp16 SIMTAmpOptimWrapper')
    p.add_argument(
        '--cfg-options',
        nargs='+',
        default=[],
        help='key=value overrides, e.g. '
        'train_dataloader.mnist_det.batch_size=4')
    p.add_argument(
        '--stock',
        action='store_true',
        help='also time each task\'s stock model (LegoResNet configs)')
    p.add_argument(
        '--synthetic',
        nargs='+',
        metavar='TASK=BxHxW',
        help='random batches of these shapes instead of the dataloaders\'')
    p.add_argument('--out', help='write the figures as JSON here')
    return p.parse_args(argv)


def synthetic_batches(model, specs: list) -> Dict[str, Any]:
    """``TASK=BxHxW`` specs -> a random batch per task of ``model``.

    Raises:
        ValueError: a spec is malformed, or the tasks named are not exactly
            the model's.
    """
    pairs = [spec.partition('=') for spec in specs]
    shapes = parse_shapes({task: shape for task, _, shape in pairs})
    if set(shapes) != set(model.tasks):
        raise ValueError(f'--synthetic names {sorted(shapes)}; give a shape '
                         f'for each task of the config: {sorted(model.tasks)}')
    return {
        task: synthetic_batch(model.tasks[task], shape, seed=i)
        for i, (task, shape) in enumerate(shapes.items())
    }


def main(argv: Optional[list] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    repo = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from mmengine.config import Config, DictAction
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope

    import projects.gppf  # noqa: F401  (registers GPPF)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        opts = argparse.ArgumentParser()
        opts.add_argument('o', nargs='+', action=DictAction)
        cfg.merge_from_dict(opts.parse_args(args.cfg_options).o)
    DefaultScope.get_instance(
        'benchmark_simt', scope_name=cfg.get('default_scope', 'mmengine'))
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(cfg.model, device)
    optim_cfg = copy.deepcopy(cfg.optim_wrapper)
    if args.amp:
        optim_cfg['type'] = 'SIMTAmpOptimWrapper'
        optim_cfg.setdefault('loss_scale', 'dynamic')
    wrapper = build_optim_wrapper(model, optim_cfg)
    batches = (
        synthetic_batches(model, args.synthetic)
        if args.synthetic else task_batches(cfg))
    stock = (stock_task_models(cfg, device, optim_cfg) if args.stock else None)
    shapes = {
        t: (len(b['inputs']), tuple(b['inputs'][0].shape))
        for t, b in batches.items()
    }
    res = benchmark(model, batches, wrapper, args.iters, args.warmup, stock)
    res.update(
        config=args.config,
        batches=shapes,
        amp=args.amp,
        synthetic=bool(args.synthetic),
        torch=torch.__version__,
        threads=torch.get_num_threads())
    mib = 2.0**20
    print(f'device {res["device"]}, torch {res["torch"]}, '
          f'{res["threads"]} threads, median of {args.iters}')
    for task in batches:
        print(f'  single {task:14s} {res["single_s"][task] * 1e3:9.1f} ms '
              f'peak {res["single_peak"][task] / mib:8.1f} MiB  '
              f'batch {shapes[task]}')
    print(f'  sum of single        {res["sum_single_s"] * 1e3:9.1f} ms')
    print(f'  SIMT iteration       {res["simt_s"] * 1e3:9.1f} ms '
          f'peak {res["simt_peak"] / mib:8.1f} MiB')
    print(f'time ratio   SIMT / sum(single) = {res["time_ratio"]:.3f} '
          f'(goal <= 1.02)')
    print(f'memory ratio SIMT / max(single) = {res["memory_ratio"]:.3f} '
          f'(goal <= 1.15); excess '
          f'{(res["simt_peak"] - max(res["single_peak"].values())) / mib:.1f}'
          f' MiB, gradient buffers {res["grad_bytes"] / mib:.1f} MiB')
    if stock:
        for task in batches:
            print(f'  stock  {task:14s} {res["stock_s"][task] * 1e3:9.1f} ms '
                  f'peak {res["stock_peak"][task] / mib:8.1f} MiB')
        print(f'  sum of stock         {res["sum_stock_s"] * 1e3:9.1f} ms')
        print('stock throughput ratio sum(stock) / SIMT = '
              f'{res["stock_throughput_ratio"]:.3f} (goal >= 0.90 on a GPU)')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == '__main__':
    main()
