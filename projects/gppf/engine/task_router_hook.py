"""TaskRouterHook: router schedules, utilisation logs and route heatmaps."""
import math
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.utils import mkdir_or_exist

from ..models.lego.router import TaskRouter

__all__ = ['TaskRouterHook']


def _anneal(span: Optional[Tuple[float, float]], progress: float,
            kind: str) -> Optional[float]:
    if span is None:
        return None
    start, end = span
    if kind == 'cos':
        progress = (1 - math.cos(math.pi * progress)) / 2
    return start + (end - start) * progress


@HOOKS.register_module()
class TaskRouterHook(Hook):
    """Schedules the task routers of the model and shows what they route.

    Schedule, by training iteration ``i``:
    ``[0, warmup_iters)``: every task keeps its initial (noise-free) route,
    so units settle before routes move; ``[warmup_iters, freeze_iter)``:
    free routing, ``temperature`` and ``noise_std`` annealed from their first
    to their second value (``anneal='linear'`` or ``'cos'``);
    ``freeze_iter`` on: every route is frozen (gates keep training).

    Every ``log_interval`` iterations it logs, per task and unit, the share of
    lego layers in which the task's route uses that unit
    (``router/<task>/unit<n>``), and the mean overlap of the tasks' routes
    (``router/overlap``). With each checkpoint it saves a PNG with one
    task x unit heatmap (softmax of the logits, active units marked) per lego
    layer, under ``<work_dir>/route_heatmaps/`` and to the visualizer.

    Args:
        temperature (tuple[float, float], optional): Start and end.
        noise_std (tuple[float, float], optional): Start and end.
        anneal (str): ``'linear'`` or ``'cos'``.
        warmup_iters (int): Iterations with fixed initial routes.
        freeze_iter (int, optional): Iteration at which routes freeze.
        log_interval (int): Logging interval in iterations.
        save_heatmaps (bool): Whether to save heatmaps with checkpoints.
    """

    priority = 'NORMAL'

    def __init__(self,
                 temperature: Optional[Sequence[float]] = None,
                 noise_std: Optional[Sequence[float]] = (1.0, 0.0),
                 anneal: str = 'linear',
                 warmup_iters: int = 0,
                 freeze_iter: Optional[int] = None,
                 log_interval: int = 50,
                 save_heatmaps: bool = True) -> None:
        if anneal not in ('linear', 'cos'):
            raise ValueError(f"anneal must be 'linear' or 'cos', got {anneal}")
        self.temperature = tuple(temperature) if temperature else None
        self.noise_std = tuple(noise_std) if noise_std else None
        self.anneal = anneal
        self.warmup_iters = warmup_iters
        self.freeze_iter = freeze_iter
        self.log_interval = log_interval
        self.save_heatmaps = save_heatmaps
        self._warm_frozen: List[str] = []

    @staticmethod
    def routers(runner) -> List[TaskRouter]:
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        routers = [m for m in model.modules() if isinstance(m, TaskRouter)]
        if not routers:
            raise RuntimeError('TaskRouterHook found no TaskRouter in the '
                               'model (is the backbone a lego backbone?)')
        return routers

    def before_train(self, runner) -> None:
        self.routers(runner)  # fail early
        if runner.iter < self.warmup_iters:
            for router in self.routers(runner):
                free = [
                    t for i, t in enumerate(router.tasks)
                    if not router.frozen[i]
                ]
                router.freeze(free)
                self._warm_frozen = free

    def before_train_iter(self,
                          runner,
                          batch_idx: int,
                          data_batch=None) -> None:
        it = runner.iter
        routers = self.routers(runner)
        if it == self.warmup_iters and self._warm_frozen:
            for router in routers:
                router.unfreeze(self._warm_frozen)
            self._warm_frozen = []
        end = self.freeze_iter if self.freeze_iter is not None else \
            runner.max_iters
        span = max(end - self.warmup_iters, 1)
        progress = min(max((it - self.warmup_iters) / span, 0.0), 1.0)
        temperature = _anneal(self.temperature, progress, self.anneal)
        noise_std = _anneal(self.noise_std, progress, self.anneal)
        for router in routers:
            if temperature is not None:
                router.temperature = temperature
            if noise_std is not None:
                router.noise_std = noise_std
            if self.freeze_iter is not None and it == self.freeze_iter:
                router.freeze()

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch=None,
                         outputs=None) -> None:
        if not self.every_n_train_iters(runner, self.log_interval):
            return
        scalars = {}
        for router in self.routers(runner):
            usage = router.usage()
            for task, table in usage.items():
                share = table.mean(0)  # (N,) share of layers using each unit
                for n, value in enumerate(share.tolist()):
                    scalars[f'router/{task}/unit{n}'] = value
            scalars['router/overlap'] = _mean_overlap(usage)
            scalars['router/temperature'] = router.temperature
            scalars['router/noise_std'] = router.noise_std
        # The message hub keeps them in the checkpoint; the logger writes
        # only ``train/`` keys, so they reach the visualizer's backends
        # (vis_data/scalars.json, TensorBoard, ...) directly.
        for key, value in scalars.items():
            runner.message_hub.update_scalar(key, value)
        runner.visualizer.add_scalars(scalars, step=runner.iter + 1)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint['task_router_hook'] = dict(warm_frozen=self._warm_frozen)
        if self.save_heatmaps and is_main_process():
            # The iteration the checkpoint is named after (iter_<n>.pth).
            step = checkpoint.get('meta', {}).get('iter', runner.iter)
            out_dir = osp.join(runner.work_dir, 'route_heatmaps')
            mkdir_or_exist(out_dir)
            for i, router in enumerate(self.routers(runner)):
                image = render_heatmaps(router)
                name = f'route_heatmap{i or ""}'
                _save_png(image, osp.join(out_dir, f'{name}_iter_{step}.png'))
                runner.visualizer.add_image(name, image, step=step)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get('task_router_hook', {})
        self._warm_frozen = list(state.get('warm_frozen', []))


def _mean_overlap(usage: Dict[str, torch.Tensor]) -> float:
    """Mean over task pairs of the share of active units they share."""
    tables = list(usage.values())
    if len(tables) < 2:
        return 1.0
    shares = []
    for a in range(len(tables)):
        for b in range(a + 1, len(tables)):
            both = (tables[a] * tables[b]).sum(1) / tables[a].sum(1)
            shares.append(both.mean().item())
    return float(np.mean(shares))


def render_heatmaps(router: TaskRouter) -> np.ndarray:
    """One task x unit panel per lego layer, as an RGB uint8 image."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    probs = F.softmax(
        router.logits.detach().float().cpu() / router.temperature,
        dim=-1)  # (T, L, N)
    usage = router.usage()
    num_tasks, num_layers, num_legos = probs.shape
    vmax = max(2.0 / num_legos, float(probs.max()))  # uniform sits mid-scale
    cols = min(num_layers, 8)
    rows = math.ceil(num_layers / cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(1.2 + cols * (0.35 * num_legos + 0.6),
                 rows * (0.3 * num_tasks + 0.9)),
        squeeze=False)
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= num_layers:
            ax.axis('off')
            continue
        ax.imshow(
            probs[:, layer].numpy(),
            vmin=0,
            vmax=vmax,
            cmap='viridis',
            aspect='auto')
        for t, task in enumerate(router.tasks):
            for n in usage[task][layer].nonzero().flatten().tolist():
                ax.plot(n, t, marker='s', ms=4, mfc='none', mec='red')
        ax.set_title(f'layer {layer}', fontsize=7)
        ax.set_xticks(range(num_legos))
        ax.set_xticklabels(range(num_legos), fontsize=6)
        ax.set_yticks(range(num_tasks))
        ax.set_yticklabels(
            router.tasks if layer % cols == 0 else [], fontsize=6)
    fig.suptitle(
        f'route probability (task x unit, colour scale 0 to '
        f'{vmax:.2f}); red: active',
        fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def _save_png(image: np.ndarray, path: str) -> None:
    from PIL import Image
    Image.fromarray(image).save(path)
