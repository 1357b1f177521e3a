"""What the non-finite checks of a SIMT iteration cost.

In one process, with the same model, optimizer and batches (one per task
from the config's ``train_dataloader``), rounds of ``model.train_step``
alternate between three guards (the order rotates every round):

* ``none``: no check at all (the code before the guard existed);
* ``loss``: ``nonfinite=dict(check_grads=False)``, the loss check and the
  norm-statistics copy before each task's forward;
* ``grads``: ``nonfinite=dict(check_grads=True)`` (the default), the same
  plus each task's gradients isolated and checked (one fused reduction).

Reported: the fastest and the median round of each, and the ratios of the
fastest rounds to ``none``'s. On a loaded machine whole iterations vary far
more than the checks cost, so the pieces are also timed alone (fastest of
``--repeats`` calls, on the model's real gradients): the buffer copy before
a task's forward, setting the accumulated gradients aside and back, and the
fused finiteness check of a task's gradients.

Example::

    python tools/analysis_tools/benchmark_nonfinite.py \
        configs/gppf/gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py --rounds 15
"""
import argparse
import copy
import json
import os.path as osp
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch

__all__ = ['NoGuard', 'main']


class NoGuard:
    """A guard that checks nothing: the SIMT step without this feature."""

    check_grads = False

    @staticmethod
    def save_buffers(module) -> List:
        return []

    @staticmethod
    def backward(name, loss, run_backward, params, **kwargs) -> bool:
        run_backward(loss)
        return True

    @staticmethod
    def record(log_vars) -> None:
        pass


def _fastest(fn, repeats: int) -> float:
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_parts(model, batches, optim_wrapper,
               repeats: int) -> Dict[str, float]:
    """Seconds (fastest of ``repeats``) of each piece of the checks of one
    iteration, on the gradients each task's backward produces alone: the
    buffer copy and the buffers' check (per task), setting the accumulated
    gradients aside and back (per task and the router's loss), the loss
    flag (same) and the gradient check (each task's and the router's own
    gradients). The reading of the flags is in ``loss_flag`` only."""
    from projects.gppf.models.nonfinite import (NonFiniteGuard,
                                                _buffers_finite, all_finite)
    model.nonfinite = NoGuard()
    params = list(model.parameters())
    loss = torch.ones((), device=params[0].device)

    def set_aside_and_back():
        stash = [p.grad for p in params]
        for p in params:
            p.grad = None
        for p, old in zip(params, stash):
            p.grad = old

    def grad_check(grads):
        return lambda: torch.cat(
            [torch.isfinite(loss).view(1),
             all_finite(grads, loss.device)]).to(torch.int32).tolist()

    checks = {}
    for task, batch in batches.items():
        optim_wrapper.zero_grad()
        model.task_backward(task, copy.deepcopy(batch), optim_wrapper)
        grads = [p.grad for p in params if p.grad is not None]
        checks[task] = _fastest(grad_check(grads), repeats)
        # What autograd's accumulation does anyway (the set-aside
        # gradients are added back with one fused add instead).
        checks[f'{task} (add)'] = _fastest(
            lambda: torch._foreach_add(grads, grads), repeats)
    optim_wrapper.zero_grad()
    model.aux_backward(optim_wrapper)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        checks['router'] = _fastest(grad_check(grads), repeats)
    optim_wrapper.zero_grad()
    n = len(batches) + (1 if grads else 0)
    saved = NonFiniteGuard.save_buffers(model)
    parts = dict(
        save_buffers=_fastest(lambda: NonFiniteGuard.save_buffers(model),
                              repeats),
        buffers_check=_fastest(
            lambda: _buffers_finite(saved, loss.device).tolist(), repeats),
        loss_flag=_fastest(
            lambda: torch.isfinite(loss).view(1).to(torch.int32).tolist(),
            repeats),
        set_aside_and_back=_fastest(set_aside_and_back, repeats),
        **{
            f'grad_check {k}': v
            for k, v in checks.items()
        })
    per_task = parts['save_buffers'] + parts['buffers_check']
    parts['loss_check_per_iter'] = (
        len(batches) * per_task + n * parts['loss_flag'])
    parts['grads_check_per_iter'] = (
        len(batches) * per_task + n * parts['set_aside_and_back'] +
        sum(v for k, v in checks.items() if not k.endswith('(add)')))
    return parts


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', help='a GPPF config with train_dataloader')
    p.add_argument('--rounds', type=int, default=15)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--repeats', type=int, default=200)
    p.add_argument('--threads', type=int, help='torch.set_num_threads')
    p.add_argument(
        '--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument(
        '--cfg-options', nargs='+', default=[], help='key=value overrides')
    p.add_argument('--out', help='write the figures as JSON here')
    return p.parse_args(argv)


def main(argv: Optional[list] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    here = osp.dirname(osp.abspath(__file__))
    repo = osp.dirname(osp.dirname(here))
    for path in (repo, here):
        if path not in sys.path:
            sys.path.insert(0, path)
    from benchmark_simt import task_batches, time_call
    from mmengine.config import Config, DictAction
    from mmengine.logging import MessageHub
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, DefaultScope

    import projects.gppf  # noqa: F401  (registers GPPF)
    from projects.gppf.models.nonfinite import NonFiniteGuard
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        opts = argparse.ArgumentParser()
        opts.add_argument('o', nargs='+', action=DictAction)
        cfg.merge_from_dict(opts.parse_args(args.cfg_options).o)
    if args.threads:
        torch.set_num_threads(args.threads)
    DefaultScope.get_instance(
        'benchmark_nonfinite', scope_name=cfg.get('default_scope', 'mmengine'))
    MessageHub.get_instance('benchmark_nonfinite')
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model = model.to(device).train()
    wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
    batches = task_batches(cfg)
    guards = dict(
        none=NoGuard(),
        loss=NonFiniteGuard(check_grads=False, max_consecutive=None),
        grads=NonFiniteGuard(check_grads=True, max_consecutive=None))

    skipped: Dict[str, float] = {name: 0.0 for name in guards}

    def step(name):

        def run():
            model.nonfinite = guards[name]
            out = model.train_step(copy.deepcopy(batches), wrapper)
            skipped[name] += sum(
                float(v) for k, v in out.items() if k.endswith('/skipped'))

        return run

    names = list(guards)
    for _ in range(args.warmup):
        for name in names:
            step(name)()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(time_call(step(name), device, 1))
    best = {n: min(t) for n, t in times.items()}
    parts = time_parts(model, batches, wrapper, args.repeats)
    res = dict(
        config=args.config,
        device=str(device),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        rounds=args.rounds,
        params=sum(1 for _ in model.parameters()),
        buffers=sum(1 for _ in model.buffers()),
        fastest_s=best,
        median_s={
            n: statistics.median(t)
            for n, t in times.items()
        },
        times_s=times,
        skipped=skipped,
        ratio_loss=best['loss'] / best['none'],
        ratio_grads=best['grads'] / best['none'],
        ratio_grads_vs_loss=best['grads'] / best['loss'],
        parts_s=parts)
    print(f'device {res["device"]}, torch {res["torch"]}, {res["threads"]} '
          f'threads, {args.rounds} alternating rounds, {res["params"]} '
          f'parameters, {res["buffers"]} buffers')
    for n in names:
        print(f'  {n:6s} fastest {best[n] * 1e3:8.1f} ms   median '
              f'{res["median_s"][n] * 1e3:8.1f} ms')
    print(f'skipped (task-iterations): {skipped}')
    print(f'fastest loss / none  = {res["ratio_loss"]:.4f}')
    print(f'fastest grads / none = {res["ratio_grads"]:.4f}')
    print(f'fastest grads / loss = {res["ratio_grads_vs_loss"]:.4f}')
    print(f'pieces alone (fastest of {args.repeats} calls):')
    for k, v in parts.items():
        print(f'  {k:32s} {v * 1e3:8.3f} ms')
    for k in ('loss_check_per_iter', 'grads_check_per_iter'):
        print(f'{k}: {parts[k] / best["none"] * 100:.3f}% of the fastest '
              'unchecked iteration')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == '__main__':
    main()
