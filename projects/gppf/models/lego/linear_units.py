"""Lego units of linear layers: row or column slices run as one dense layer.

A :class:`LegoLinear` splits either its output features (``lego_out``: each
unit owns rows of the weight and their bias) or its input features (each unit
owns columns; the bias is shared) into ``num_legos`` units. A route of ``k``
units computes the dense layer of the active width, ``F.linear(x, W, b)``
with ``W, b = gather(units, gates)``, through an autograd Function that, like
a dense ``nn.Linear``, saves only ``x`` and (references to) the weights:
row units build the gathered weight for each matmul and drop it; column units
run one matmul per unit, accumulated into the output, with the gate as the
matmul's scale. As in :mod:`.layers`, each unit is its own parameter: the
units outside the route get no gradient (``grad is None``); the gates get
theirs, so the router learns.

``groups`` serves fused projections: with ``groups=3`` (a ViT's fused qkv) a
unit owns ``unit_width`` rows of each of the q, k and v blocks, and the
gathered weight is ``[q rows of the route; k rows; v rows]``, the layout of a
dense fused qkv of the active heads. Plain torch; no registry.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ['LegoLinear']


def _cat_rows(parts: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """Concatenate row units (weights or biases) group by group: the rows of
    group ``h`` of every unit, then group ``h + 1``."""
    return torch.cat([p.view(groups, -1, *p.shape[1:]) for p in parts],
                     1).flatten(0, 1)


def _split_rows(full: torch.Tensor, groups: int, k: int) -> List[torch.Tensor]:
    """Inverse of :func:`_cat_rows`, as ``k`` new contiguous tensors."""
    parts = full.view(groups, k, -1, *full.shape[1:]).unbind(1)
    return [
        p.clone(memory_format=torch.contiguous_format).flatten(0, 1)
        for p in parts
    ]


class _RowUnits(torch.autograd.Function):
    """``F.linear`` of the concatenated row units (see :func:`_cat_rows`).

    The gathered weight lives only while a matmul needs it: the forward and
    the backward each build it, and autograd keeps ``x`` and the units.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, groups: int, k: int,
                *params) -> torch.Tensor:
        """``params``: the ``k`` unit weights, then their biases if any."""
        weights, biases = params[:k], params[k:]
        bias = _cat_rows(biases, groups) if biases else None
        ctx.groups, ctx.k, ctx.has_bias = groups, k, bool(biases)
        ctx.save_for_backward(x, *weights)
        return F.linear(x, _cat_rows(weights, groups), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        x, *weights = ctx.saved_tensors
        groups, k = ctx.groups, ctx.k
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        go = grad.contiguous().view(x2.shape[0], -1)
        grad_x = None
        grad_w = grad_b = [None] * k
        if need[0]:
            grad_x = torch.mm(go, _cat_rows(weights, groups)).view_as(x)
        if any(need[3:3 + k]):
            grad_w = _split_rows(torch.mm(go.t(), x2), groups, k)
        if ctx.has_bias and any(need[3 + k:]):
            grad_b = _split_rows(go.sum(0), groups, k)
        return (grad_x, None, None, *grad_w, *(grad_b if ctx.has_bias else []))


class _ColumnUnits(torch.autograd.Function):
    """Column units: ``y = b + sum_j a_j x[..., cols_j] @ W_j.T``: one
    matmul per unit, accumulated into ``y``, scaled by the gate ``a_j``
    (``alphas``: the values of ``gates``, which are passed so that autograd
    routes their gradient); no gathered or gated weight is built."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alphas: Sequence[float],
                gates: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                *weights: torch.Tensor) -> torch.Tensor:
        u = weights[0].shape[1]
        x2 = x.reshape(-1, x.shape[-1])
        base = x2.new_zeros(()) if bias is None else bias
        out = torch.addmm(base, x2[:, :u], weights[0].t(), alpha=alphas[0])
        for j in range(1, len(weights)):
            out.addmm_(
                x2[:, j * u:(j + 1) * u], weights[j].t(), alpha=alphas[j])
        ctx.alphas = alphas
        ctx.gate_dtype = None if gates is None else gates.dtype
        ctx.save_for_backward(x, *weights)
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        x, *weights = ctx.saved_tensors
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        go = grad.contiguous().view(x2.shape[0], -1)
        u = weights[0].shape[1]
        grad_x = x2.new_empty(x2.shape) if need[0] else None
        grad_gates = [] if need[2] else None
        grad_w = []
        for j, (w, alpha) in enumerate(zip(weights, ctx.alphas)):
            cols = slice(j * u, (j + 1) * u)
            if need[0]:
                part = grad_x[:, cols]
                torch.addmm(part, go, w, beta=0, alpha=alpha, out=part)
            if not (need[4 + j] or need[2]):
                grad_w.append(None)
                continue
            g = torch.mm(go.t(), x2[:, cols])  # d loss / d (alpha * W_j)
            if need[2]:
                grad_gates.append(torch.vdot(g.view(-1), w.reshape(-1)))
            if alpha != 1:
                g.mul_(alpha)
            grad_w.append(g if need[4 + j] else None)
        if grad_gates is not None:
            grad_gates = torch.stack(grad_gates).to(ctx.gate_dtype)
        grad_b = go.sum(0) if need[3] else None
        if grad_x is not None:
            grad_x = grad_x.view_as(x)
        return (grad_x, None, grad_gates, grad_b, *grad_w)


class LegoLinear(nn.Module):
    """A linear layer whose output rows or input columns are lego units.

    Args:
        in_features (int): Input features (per unit unless ``lego_out``).
        out_features (int): Output features per group (per unit and group if
            ``lego_out``).
        num_legos (int): Units (N).
        num_active (int): Units a route activates (k); sets the fan of the
            default init, so a gathered layer is initialised like its dense
            equivalent.
        lego_out (bool): Units split the output features (rows, with their
            bias); else they split the input features (columns) and the bias
            is shared.
        groups (int): Row blocks a unit takes its rows from (``lego_out``
            only), e.g. 3 for a fused qkv.
        bias (bool): Whether the layer has a bias.
        init (str): ``'linear'`` (torch's ``nn.Linear`` default) or
            ``'xavier'`` (xavier-uniform weight, ``N(0, 1e-6)`` bias: mmcv's
            ``FFN`` in mmpretrain's ViT layers).

    Unit ``i``'s weight is ``weight[i]``: ``(groups * u, in_features)`` with
    ``lego_out``, else ``(out_features, u)``; ``u`` is the unit width.
    """

    def __init__(self,
                 in_features: int,
                 out_features: int,
                 num_legos: int,
                 num_active: int,
                 lego_out: bool,
                 groups: int = 1,
                 bias: bool = True,
                 init: str = 'linear') -> None:
        super().__init__()
        if groups != 1 and not lego_out:
            raise ValueError('groups > 1 needs lego_out=True')
        if init not in ('linear', 'xavier'):
            raise ValueError(f"init must be 'linear' or 'xavier', got {init}")
        self.in_features = in_features
        self.out_features = out_features
        self.num_legos = num_legos
        self.num_active = num_active
        self.lego_out = lego_out
        self.groups = groups
        self.init = init
        self.unit_width = out_features if lego_out else in_features
        shape = ((groups * out_features, in_features) if lego_out else
                 (out_features, in_features))
        self.weight = nn.ParameterList(
            nn.Parameter(torch.empty(shape)) for _ in range(num_legos))
        if not bias:
            self.bias = None
        elif lego_out:
            self.bias = nn.ParameterList(
                nn.Parameter(torch.empty(groups * out_features))
                for _ in range(num_legos))
        else:
            self.bias = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def active_shape(self) -> Tuple[int, int]:
        """``(out, in)`` of the dense layer a route gathers."""
        if self.lego_out:
            return (self.groups * self.out_features * self.num_active,
                    self.in_features)
        return self.out_features, self.in_features * self.num_active

    def reset_parameters(self) -> None:
        """Initialise every unit as a slice of the dense active layer."""
        fan_out, fan_in = self.active_shape()
        if self.init == 'xavier':
            bound = math.sqrt(6.0 / (fan_in + fan_out))
        else:  # kaiming_uniform(a=sqrt(5)) of nn.Linear
            bound = 1.0 / math.sqrt(fan_in)
        for weight in self.weight:
            nn.init.uniform_(weight, -bound, bound)
        biases = ([] if self.bias is None else
                  self.bias if self.lego_out else [self.bias])
        for bias in biases:
            if self.init == 'xavier':
                nn.init.normal_(bias, std=1e-6)
            else:
                b = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(bias, -b, b)

    def gather(
        self,
        units: Sequence[int],
        gates: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Dense weight and bias of the route ``units`` (k ints).

        Args:
            gates (Tensor, optional): ``(k, )`` gates that scale each unit's
                contribution; input-side units only (they scale the unit's
                columns, so ``F.linear`` sums gated unit outputs).
        """
        if self.lego_out:
            if gates is not None:
                raise ValueError('gates scale input-side (column) units')
            weight = _cat_rows([self.weight[i] for i in units], self.groups)
            bias = None if self.bias is None else _cat_rows(
                [self.bias[i] for i in units], self.groups)
            return weight, bias
        weight = torch.cat([self.weight[i] for i in units], 1)
        if gates is not None:
            weight = weight * gates.to(weight.dtype).repeat_interleave(
                self.in_features)
        return weight, self.bias

    def forward(self,
                x: torch.Tensor,
                units: Sequence[int],
                gates: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` (..., in) -> (..., out) through the route's units; equals
        ``F.linear(x, *self.gather(units, gates))``.

        Autograd saves ``x`` and references to the routed units (as a dense
        ``nn.Linear`` saves ``x`` and its weight), not the gathered weight.
        Gates enter as floats (``gates.tolist()``: a host sync on a GPU).
        """
        device = x.device.type
        dtype = (
            torch.get_autocast_dtype(device)
            if torch.is_autocast_enabled(device) else None)

        def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            """Cast as autocast casts ``F.linear``'s tensors."""
            if dtype is None or t is None or t.dtype == torch.float64:
                return t
            return t.to(dtype)

        weights = [cast(self.weight[i]) for i in units]
        with torch.autocast(device, enabled=False):
            if self.lego_out:
                if gates is not None:
                    raise ValueError('gates scale input-side (column) units')
                biases = ([] if self.bias is None else
                          [cast(self.bias[i]) for i in units])
                return _RowUnits.apply(
                    cast(x), self.groups, len(units), *weights, *biases)
            alphas = [1.0] * len(units) if gates is None else gates.tolist()
            return _ColumnUnits.apply(
                cast(x), alphas, gates, cast(self.bias), *weights)

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   slots: Sequence[int]) -> None:
        """Inflate: unit ``i`` copies the dense slice ``slots[i]``.

        Raises:
            ValueError: the dense tensors do not have the shape of ``k``
                units (names the expected shape).
        """
        k = max(slots) + 1
        g, u = self.groups, self.unit_width
        if self.lego_out:
            expected = (g * u * k, self.in_features)
        else:
            expected = (self.out_features, u * k)
        if tuple(weight.shape) != expected:
            raise ValueError(f'cannot inflate a dense weight of shape '
                             f'{tuple(weight.shape)} into {self.num_legos} '
                             f'units of width {u}: expected {expected}')
        if (bias is None) != (self.bias is None):
            raise ValueError(
                'the dense layer and the lego layer disagree on having a '
                f'bias (dense: {bias is not None})')
        for i, slot in enumerate(slots):
            part = slice(slot * u, (slot + 1) * u)
            if self.lego_out:
                dense = weight.view(g, u * k, -1)[:, part].reshape(g * u, -1)
                self.weight[i].copy_(dense)
                if bias is not None:
                    self.bias[i].copy_(
                        bias.view(g, u * k)[:, part].reshape(-1))
            else:
                self.weight[i].copy_(weight[:, part])
        if bias is not None and not self.lego_out:
            self.bias.copy_(bias)

    def extra_repr(self) -> str:
        return (f'in={self.in_features}, out={self.out_features}, '
                f'units={self.num_legos}, lego_out={self.lego_out}, '
                f'groups={self.groups}, bias={self.bias is not None}')
