"""The lego maths: channel-slice units gathered into one dense op.

A lego layer has ``num_legos`` (N) units of ``unit_width`` (u) channels. Each
unit's slice of a conv weight (and of a norm's affine) is its own
``nn.Parameter``; a route of ``k`` units copies the selected slices into one
dense ``k * u``-channel weight (one ``torch.cat``, or one copy per block of
:func:`gather_blocks` when both sides are units) and runs one dense
convolution. The backward hands each selected unit a view of the dense
gradient, and the units outside the route get no gradient
at all (``grad is None``), so optimizers leave them untouched (no weight
decay, no momentum step) and no full-size gradient is zero-filled. Running
statistics live in one ``N * u`` buffer per norm (one row per task with
``num_tasks``), gathered and written back with one ``index_select`` /
``index_copy_`` each. Plain torch; no registry.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    'route_channels', 'inflate_slots', 'replicate_task_rows',
    'gather_blocks', 'LegoConv2d', 'LegoBatchNorm'
]


def route_channels(indices: torch.Tensor, unit_width: int) -> torch.Tensor:
    """Channel ids of the units ``indices`` (..., k): shape (..., k * u)."""
    offsets = torch.arange(unit_width, device=indices.device)
    return (indices.unsqueeze(-1) * unit_width + offsets).flatten(-2)


def inflate_slots(num_legos: int, num_active: int) -> List[int]:
    """Dense slice each unit copies when inflating a dense layer.

    Unit ``i`` gets slice ``i mod k``, so any route that covers every slice
    once reproduces the dense layer (up to a permutation of hidden channels).
    """
    return [i % num_active for i in range(num_legos)]


def replicate_task_rows(module: nn.Module, state_dict: dict,
                        prefix: str) -> None:
    """In ``state_dict``, repeat statistics kept for all tasks (one row
    less than ``module``'s per-task buffers) over the task rows."""
    for name in ('running_mean', 'running_var', 'num_batches_tracked'):
        value = state_dict.get(prefix + name)
        ours = getattr(module, name)
        if value is not None and value.shape == ours.shape[1:]:
            state_dict[prefix + name] = value.expand_as(ours).clone()


class _GatherBlocks(torch.autograd.Function):
    """The ``k x k`` block matrix of equally shaped blocks, in one copy per
    block (``torch.cat`` of row ``cat``s copies every block twice); the
    backward hands each block its view of the gradient."""

    @staticmethod
    def forward(ctx, k: int, *blocks: torch.Tensor) -> torch.Tensor:
        rows, cols = blocks[0].shape[:2]
        out = blocks[0].new_empty((k * rows, k * cols) +
                                  tuple(blocks[0].shape[2:]))
        for idx, block in enumerate(blocks):
            a, b = divmod(idx, k)
            out[a * rows:(a + 1) * rows, b * cols:(b + 1) * cols] = block
        ctx.k, ctx.rows, ctx.cols = k, rows, cols
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        k, rows, cols = ctx.k, ctx.rows, ctx.cols
        views = (grad[a * rows:(a + 1) * rows, b * cols:(b + 1) * cols]
                 if ctx.needs_input_grad[1 + a * k + b] else None
                 for a in range(k) for b in range(k))
        return (None, *views)


def gather_blocks(blocks: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """``[[blocks[0] .. blocks[k-1]], [blocks[k] ..], ..]`` as one tensor:
    ``blocks[a * k + b]`` lands at block row ``a``, block column ``b``
    (dims 0 and 1)."""
    if len(blocks) != k * k:
        raise ValueError(f'{len(blocks)} blocks do not make a {k} x {k} '
                         f'block matrix')
    return _GatherBlocks.apply(k, *blocks)


class LegoConv2d(nn.Module):
    """A bias-free conv whose output and/or input channels are lego units.

    Args:
        in_channels (int): Input channels (per unit if ``lego_in``).
        out_channels (int): Output channels (per unit if ``lego_out``).
        kernel_size (int): Square kernel size.
        num_legos (int): Units (N).
        lego_out (bool): Output channels are split into units.
        lego_in (bool): Input channels are split into units.
        active_out (int): Output channels of the gathered conv; sets the fan of
            the default init, so a gathered sub-network is initialised like
            its dense equivalent.
        stride, padding, dilation (int): As in :class:`torch.nn.Conv2d`.

    With both ``lego_out`` and ``lego_in`` each ordered pair of units
    ``(i, j)`` owns the block from input unit ``j`` to output unit ``i``
    (``weight[i * N + j]``); else ``weight[i]`` is unit ``i``'s slice.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: int,
                 num_legos: int,
                 lego_out: bool,
                 lego_in: bool,
                 active_out: int,
                 stride: int = 1,
                 padding: int = 0,
                 dilation: int = 1) -> None:
        super().__init__()
        if not (lego_out or lego_in):
            raise ValueError('a LegoConv2d needs lego_out or lego_in')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.num_legos = num_legos
        self.lego_out = lego_out
        self.lego_in = lego_in
        self.active_out = active_out
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        count = num_legos * num_legos if lego_out and lego_in else num_legos
        self.weight = nn.ParameterList(
            nn.Parameter(
                torch.empty(out_channels, in_channels, kernel_size,
                            kernel_size)) for _ in range(count))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming normal, fan-out of the *active* width (relu gain)."""
        std = (2.0 / (self.active_out * self.kernel_size**2))**0.5
        for weight in self.weight:
            nn.init.normal_(weight, 0.0, std)

    def gather(self, units: Sequence[int]) -> torch.Tensor:
        """Dense weight of the route ``units`` (k ints, ascending)."""
        w = self.weight
        if self.lego_out and self.lego_in:
            n = self.num_legos
            return gather_blocks([w[i * n + j] for i in units for j in units],
                                 len(units))
        return torch.cat([w[i] for i in units], 0 if self.lego_out else 1)

    def load_dense(self, dense: torch.Tensor, slots: Sequence[int]) -> None:
        """Inflate: unit ``i`` copies the dense slice ``slots[i]``."""
        k = max(slots) + 1
        width_out = self.out_channels
        width_in = self.in_channels
        expected = (width_out * k if self.lego_out else width_out,
                    width_in * k if self.lego_in else width_in)
        if tuple(dense.shape[:2]) != expected:
            raise ValueError(f'cannot inflate a dense weight of shape '
                             f'{tuple(dense.shape)} into units of shape '
                             f'{tuple(self.weight[0].shape)}: expected '
                             f'{expected + tuple(dense.shape[2:])}')
        with torch.no_grad():
            for idx, weight in enumerate(self.weight):
                i, j = divmod(idx, self.num_legos) if (
                    self.lego_out and self.lego_in) else (idx, idx)
                block = dense
                if self.lego_out:
                    block = block.narrow(0, slots[i] * width_out, width_out)
                if self.lego_in:
                    block = block.narrow(1, slots[j] * width_in, width_in)
                weight.copy_(block)

    def forward(self, x: torch.Tensor, units: Sequence[int]) -> torch.Tensor:
        """Convolve ``x`` (B, C_in, H, W) with the units of the route."""
        return F.conv2d(x, self.gather(units), None, self.stride, self.padding,
                        self.dilation)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, '
                f'kernel_size={self.kernel_size}, units={self.num_legos}, '
                f'lego_out={self.lego_out}, lego_in={self.lego_in}, '
                f'stride={self.stride}, padding={self.padding}, '
                f'dilation={self.dilation}')


class LegoBatchNorm(nn.Module):
    """Batch norm whose channels belong to lego units.

    Each unit has its own affine parameters (``weight[i]``, ``bias[i]``) and
    running statistics (its slice of ``running_mean`` / ``running_var``).
    The selected units are normalised by one ``F.batch_norm``; an optional
    per-channel gate (> 0) scales the affine output.

    Args:
        unit_width (int): Channels per unit (u).
        num_legos (int): Units (N).
        eps, momentum: As in :class:`torch.nn.BatchNorm2d`.
        requires_grad (bool): Whether the affine parameters train.
        num_tasks (int, optional): Keep the statistics per task: shapes
            ``(num_tasks, N * u)`` and ``(num_tasks, )``, the row
            :attr:`task_index` used (set by the owner before the forward).
            ``None``: one set for all tasks.
    """

    task_index: int = 0

    def __init__(self,
                 unit_width: int,
                 num_legos: int,
                 eps: float = 1e-5,
                 momentum: float = 0.1,
                 requires_grad: bool = True,
                 num_tasks: Optional[int] = None) -> None:
        super().__init__()
        self.unit_width = unit_width
        self.num_legos = num_legos
        self.num_tasks = num_tasks
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.ParameterList(
            nn.Parameter(torch.ones(unit_width), requires_grad=requires_grad)
            for _ in range(num_legos))
        self.bias = nn.ParameterList(
            nn.Parameter(torch.zeros(unit_width), requires_grad=requires_grad)
            for _ in range(num_legos))
        rows = () if num_tasks is None else (num_tasks, )
        size = rows + (unit_width * num_legos, )
        self.register_buffer('running_mean', torch.zeros(size))
        self.register_buffer('running_var', torch.ones(size))
        self.register_buffer('num_batches_tracked',
                             torch.zeros(rows, dtype=torch.long))

    def reset_parameters(self) -> None:
        for weight, bias in zip(self.weight, self.bias):
            nn.init.ones_(weight)
            nn.init.zeros_(bias)

    def forward(self,
                x: torch.Tensor,
                units: Sequence[int],
                channels: torch.Tensor,
                gates: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalise ``x`` (B, k*u, H, W).

        Args:
            units: The route's k unit ids.
            channels (Tensor): Their ``k * u`` channel ids.
            gates (Tensor, optional): ``(k * u, )`` per-channel gates.
        """
        weight = torch.cat([self.weight[i] for i in units])
        bias = torch.cat([self.bias[i] for i in units])
        if gates is not None:
            weight = weight * gates
            bias = bias * gates
        stats = self.task_stats(self.task_index)
        mean = stats['running_mean'].index_select(0, channels)
        var = stats['running_var'].index_select(0, channels)
        out = F.batch_norm(x, mean, var, weight, bias, self.training,
                           self.momentum, self.eps)
        if self.training:
            # F.batch_norm updated the gathered copies in place.
            with torch.no_grad():
                stats['running_mean'].index_copy_(0, channels, mean)
                stats['running_var'].index_copy_(0, channels, var)
                stats['num_batches_tracked'].add_(1)
        return out

    def updated_stats_mask(self,
                           x: torch.Tensor,
                           units: Sequence[int],
                           channels: torch.Tensor,
                           gates: Optional[torch.Tensor] = None
                           ) -> torch.Tensor:
        """Which running statistics a training-mode forward with these
        arguments updates: a 0/1 mask shaped like ``running_mean``, set on
        the route's ``channels`` (of the row :attr:`task_index` when the
        statistics are kept per task). Asked by
        :class:`~projects.gppf.utils.dist_sync.NormStatsSync`."""
        mask = torch.zeros_like(self.running_mean)
        row = mask if self.num_tasks is None else mask[self.task_index]
        row.index_fill_(0, channels, 1.0)
        return mask

    def task_stats(self, task_index: int) -> dict:
        """Views of the statistics of task ``task_index`` (all of them when
        they are not kept per task)."""
        names = ('running_mean', 'running_var', 'num_batches_tracked')
        if self.num_tasks is None:
            return {name: getattr(self, name) for name in names}
        return {name: getattr(self, name)[task_index] for name in names}

    def gather(self, units: Sequence[int], task_index: int = 0) -> dict:
        """The route's dense ``weight``, ``bias`` and the statistics of
        task ``task_index``."""
        channels = route_channels(
            torch.as_tensor(list(units), device=self.running_mean.device),
            self.unit_width)
        stats = self.task_stats(task_index)
        return dict(
            weight=torch.cat([self.weight[i] for i in units]),
            bias=torch.cat([self.bias[i] for i in units]),
            running_mean=stats['running_mean'].index_select(0, channels),
            running_var=stats['running_var'].index_select(0, channels),
            num_batches_tracked=stats['num_batches_tracked'].clone())

    def load_dense(self, dense: dict, slots: Sequence[int]) -> None:
        """Inflate from a dense norm's tensors: unit ``i`` <- ``slots[i]``."""
        u = self.unit_width
        k = max(slots) + 1
        for name, value in dense.items():
            if name != 'num_batches_tracked' and value.shape != (u * k, ):
                raise ValueError(f'cannot inflate a dense norm {name} of '
                                 f'shape {tuple(value.shape)} into units of '
                                 f'width {u}: expected ({u * k},)')
        with torch.no_grad():
            for i, slot in enumerate(slots):
                part = slice(slot * u, (slot + 1) * u)
                mine = slice(i * u, (i + 1) * u)
                if 'weight' in dense:
                    self.weight[i].copy_(dense['weight'][part])
                if 'bias' in dense:
                    self.bias[i].copy_(dense['bias'][part])
                for stat in ('running_mean', 'running_var'):
                    if stat in dense:  # every task's row
                        getattr(self, stat)[..., mine] = dense[stat][part]
            if 'num_batches_tracked' in dense:
                self.num_batches_tracked.copy_(dense['num_batches_tracked'])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args,
                              **kwargs) -> None:
        """Replicate statistics kept for all tasks over the task rows."""
        if self.num_tasks is not None:
            replicate_task_rows(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f'units={self.num_legos}, unit_width={self.unit_width}, '
                f'eps={self.eps}, momentum={self.momentum}, '
                f'num_tasks={self.num_tasks}')
