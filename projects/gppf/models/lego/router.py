"""Task-level top-k routing over the lego units of every lego layer.

One routing decision per task per forward pass, shared by every sample of that
task's batch, made for all lego layers at once (one ``topk`` over a
``(num_layers, num_legos)`` score table). Plain torch; no registry.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .packed_state import pack_state, unpack_state

__all__ = ['Route', 'TaskRouter']


class Route(NamedTuple):
    """The active units of one task.

    Attributes:
        indices (Tensor): ``(num_layers, num_active)`` int64, unit ids in
            ascending order per layer.
        gates (Tensor): ``(num_layers, num_active)`` gate weights; they sum
            to ``num_active`` per layer, so equal logits give gates of 1.
    """
    indices: torch.Tensor
    gates: torch.Tensor


class TaskRouter(nn.Module):
    """Learnable per-task, per-layer logits that choose ``num_active`` units.

    While training, selection uses ``logits + noise_std * N(0, 1)``; the noise
    comes from a generator seeded by ``(seed, task, per-task call count)`` so
    that every rank draws the same route and a resumed run draws the same
    routes as an uninterrupted one. Gates are ``num_active * softmax(logits /
    temperature)`` over the selected units (noise-free, differentiable). A
    frozen task keeps its indices fixed; its gates stay learnable.

    Args:
        tasks: Task names, in a fixed order.
        num_layers: Number of lego layers.
        num_legos: Units per lego layer (N).
        num_active: Active units per task and layer (k).
        temperature: Softmax temperature of the gates.
        noise_std: Std of the selection noise while training.
        balance_weight: Weight of the auxiliary balance loss.
        init_std: Std of the random initial logits (distinct initial routes).
        seed: Seed of the selection noise.
    """

    def __init__(self,
                 tasks: Sequence[str],
                 num_layers: int,
                 num_legos: int,
                 num_active: int,
                 temperature: float = 1.0,
                 noise_std: float = 0.0,
                 balance_weight: float = 0.01,
                 init_std: float = 0.01,
                 seed: int = 0) -> None:
        super().__init__()
        tasks = list(tasks)
        if not tasks or len(set(tasks)) != len(tasks) or not all(
                isinstance(t, str) and t for t in tasks):
            raise ValueError(
                f'tasks must be distinct non-empty names, got {tasks!r}')
        if not 1 <= num_active <= num_legos:
            raise ValueError(f'num_active must be in [1, num_legos='
                             f'{num_legos}], got num_active={num_active}')
        self.tasks: List[str] = tasks
        self.num_layers = num_layers
        self.num_legos = num_legos
        self.num_active = num_active
        self.balance_weight = balance_weight
        self.seed = seed
        self.init_std = init_std
        shape = (len(tasks), num_layers, num_legos)
        self.logits = nn.Parameter(torch.zeros(shape))
        # Python-side state (no device sync in the hot path); it travels in
        # the state dict through get_extra_state/set_extra_state.
        self.temperature = float(temperature)
        self.noise_std = float(noise_std)
        self.frozen: List[bool] = [False] * len(tasks)
        self.num_calls: List[int] = [0] * len(tasks)
        self.routed: Dict[int, torch.Tensor] = {}  # task -> last (L, k)
        self.register_buffer(
            'frozen_indices',
            torch.zeros(len(tasks), num_layers, num_active, dtype=torch.long))
        self.reset_logits()

    def reset_logits(self) -> None:
        """Small random logits, so tasks start from distinct routes."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        with torch.no_grad():
            self.logits.copy_(
                torch.randn(self.logits.shape, generator=gen) * self.init_std)

    def task_index(self, task: str) -> int:
        """Position of ``task``; a clear error for an unknown name."""
        try:
            return self.tasks.index(task)
        except ValueError:
            raise KeyError(f'unknown task {task!r}: this router routes the '
                           f'tasks {self.tasks}') from None

    def _noise(self, t: int) -> torch.Tensor:
        count = self.num_calls[t]
        gen = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + t * 7_919 + count) % (2**63 - 1))
        noise = torch.randn(self.logits.shape[1:], generator=gen)
        return noise.to(self.logits.device, non_blocking=True)

    def forward(self, task: str) -> Route:
        """Choose the route of ``task`` for one forward pass."""
        t = self.task_index(task)
        if self.frozen[t]:
            indices = self.frozen_indices[t]
        else:
            scores = self.logits[t].detach()
            if self.training and self.noise_std > 0:
                scores = scores + self.noise_std * self._noise(t)
            indices = scores.topk(
                self.num_active, dim=1).indices.sort(dim=1).values
        if self.training:
            self.num_calls[t] += 1
            self.routed[t] = indices
        return Route(indices, self._gates(t, indices))

    def _gates(self, t: int, indices: torch.Tensor) -> torch.Tensor:
        selected = self.logits[t].gather(1, indices) / self.temperature
        return F.softmax(selected, dim=1) * self.num_active

    def greedy_route(self, task: str) -> Route:
        """The noise-free (or frozen) route of ``task``; no side effects."""
        indices = self.greedy_indices(task)
        return Route(indices, self._gates(self.task_index(task), indices))

    def greedy_indices(self, task: str) -> torch.Tensor:
        """Noise-free top-k (or frozen) indices of ``task``: ``(L, k)``."""
        t = self.task_index(task)
        if self.frozen[t]:
            return self.frozen_indices[t].clone()
        return self.logits[t].detach().topk(
            self.num_active, dim=1).indices.sort(dim=1).values

    def freeze(self, tasks: Optional[Sequence[str]] = None) -> None:
        """Fix the current noise-free route of ``tasks`` (default: all)."""
        for task in (self.tasks if tasks is None else tasks):
            self.set_route(task, self.greedy_indices(task))

    def set_route(self, task: str, indices: torch.Tensor) -> None:
        """Fix the route of ``task`` to ``indices`` of shape ``(L, k)``."""
        t = self.task_index(task)
        indices = torch.as_tensor(indices, dtype=torch.long)
        expected = (self.num_layers, self.num_active)
        if tuple(indices.shape) != expected:
            raise ValueError(f'route of task {task!r} must have shape '
                             f'{expected}, got {tuple(indices.shape)}')
        if indices.min() < 0 or indices.max() >= self.num_legos:
            raise ValueError(f'route of task {task!r} names units outside '
                             f'[0, {self.num_legos})')
        indices = indices.sort(dim=1).values
        if (indices[:, 1:] == indices[:, :-1]).any():
            raise ValueError(f'route of task {task!r} repeats a unit')
        self.frozen_indices[t] = indices.to(self.frozen_indices.device)
        self.frozen[t] = True

    def unfreeze(self, tasks: Optional[Sequence[str]] = None) -> None:
        """Let ``tasks`` (default: all) route freely again."""
        for task in (self.tasks if tasks is None else tasks):
            self.frozen[self.task_index(task)] = False

    def aux_loss(self) -> torch.Tensor:
        """Balance loss over the tasks routed since the last training step.

        Switch-Transformer style, at task level: per layer,
        ``N * sum_n f_n * P_n`` where ``f_n`` is the fraction of (task, slot)
        selections that chose unit ``n`` and ``P_n`` the mean over tasks of
        ``softmax(logits / temperature)``. It is 1 when usage is uniform and
        grows as tasks collapse onto the same units (or leave units idle).
        Returns ``balance_weight`` times its mean over layers; 0 when fewer
        than two tasks were routed or all routed tasks are frozen.
        """
        ran = sorted(t for t in self.routed if not self.frozen[t])
        if len(ran) < 2 or self.num_active == self.num_legos:
            return self.logits.sum() * 0.0
        idx = torch.stack([self.routed[t] for t in ran])  # (T', L, k)
        frac = F.one_hot(idx, self.num_legos).sum(2).float().mean(0)
        frac = frac / self.num_active  # (L, N), rows sum to 1
        prob = F.softmax(self.logits[ran] / self.temperature, dim=-1).mean(0)
        loss = self.num_legos * (frac * prob).sum(-1).mean()
        return self.balance_weight * loss

    def reset_usage(self) -> None:
        """Forget which tasks ran (called after each optimizer step)."""
        self.routed.clear()

    def step_state(self) -> torch.Tensor:
        """This rank's routing in the current step, for a MAX all-reduce.

        Returns:
            Tensor: int64 ``(T * L * k + T, )``: each task's routed indices
            (``-1`` where the task did not run) then the call counts.
        """
        device = self.logits.device
        routed = torch.full(
            (len(self.tasks), self.num_layers, self.num_active),
            -1,
            dtype=torch.long,
            device=device)
        for t, indices in self.routed.items():
            routed[t] = indices
        counts = torch.tensor(self.num_calls, dtype=torch.long, device=device)
        return torch.cat([routed.view(-1), counts])

    def load_step_state(self, state: torch.Tensor) -> None:
        """Adopt the MAX over ranks of :meth:`step_state`: the routes of
        every task any rank ran (for :meth:`aux_loss`) and the call counts
        (ranks that run a task draw the same noise, so the counts of the
        ranks that ran it are equal and the maximum)."""
        n = len(self.tasks) * self.num_layers * self.num_active
        routed = state[:n].view(
            len(self.tasks), self.num_layers, self.num_active)
        ran = (routed[:, 0, 0] >= 0).tolist()
        self.routed = {t: routed[t] for t, r in enumerate(ran) if r}
        self.num_calls = [int(c) for c in state[n:].tolist()]

    def usage(self) -> Dict[str, torch.Tensor]:
        """Per task, a ``(L, N)`` 0/1 map of its noise-free route."""
        out = {}
        for task in self.tasks:
            idx = self.greedy_indices(task)
            out[task] = F.one_hot(idx, self.num_legos).sum(1).float()
        return out

    def get_extra_state(self) -> torch.Tensor:
        return pack_state(
            dict(
                tasks=list(self.tasks),
                frozen=list(self.frozen),
                num_calls=list(self.num_calls),
                temperature=self.temperature,
                noise_std=self.noise_std))

    def set_extra_state(self, state: Union[torch.Tensor, dict]) -> None:
        state = unpack_state(state)
        if list(state['tasks']) != self.tasks:
            raise ValueError(
                f'checkpoint router routes tasks {list(state["tasks"])}, '
                f'this model routes {self.tasks}')
        self.frozen = [bool(f) for f in state['frozen']]
        self.num_calls = [int(c) for c in state['num_calls']]
        self.temperature = float(state['temperature'])
        self.noise_std = float(state['noise_std'])

    def extra_repr(self) -> str:
        return (f'tasks={self.tasks}, num_layers={self.num_layers}, '
                f'num_legos={self.num_legos}, num_active={self.num_active}')
