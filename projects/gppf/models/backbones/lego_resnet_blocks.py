"""Residual blocks whose inner width is made of lego units.

The units of a block are channel slices of its inner width: for a bottleneck
the outputs of ``conv1`` (with ``bn1``), both sides of ``conv2`` (with
``bn2``) and the inputs of ``conv3``; for a basic block the outputs of
``conv1`` (with ``bn1``) and the inputs of ``conv2``. The residual stream and
its norms (``bn3`` / basic ``bn2``, ``downsample``) are shared. A task's gate
scales each active unit's output through the affine of the unit's last norm.
Module names match mmdet/mmseg/mmpretrain ``ResNet`` blocks, so a dense
checkpoint maps onto the units module by module.
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer

from ..lego.layers import LegoBatchNorm, LegoConv2d

__all__ = ['LegoBasicBlock', 'LegoBottleneck']


class _LegoBlock(nn.Module):
    """Shared plumbing: the constructor, downsample, checkpointing.

    Args:
        inplanes (int): Input channels.
        planes (int): Inner width of the dense block; its ``num_active``
            active units of ``planes // num_active`` channels add up to it.
        num_legos (int): Units per lego layer.
        num_active (int): Units a route activates.
        stride (int): Stride of the block.
        dilation (int): Dilation of the 3x3 convolution(s).
        downsample (nn.Module, optional): Projection of the identity.
        style (str): ``'pytorch'`` (stride on the 3x3 conv) or ``'caffe'``
            (stride on the first 1x1 conv); bottleneck only.
        with_cp (bool): Gradient checkpointing of the block.
        norm_cfg (dict): The shared (residual) norm.
        unit_norm (dict): Keyword arguments of each ``LegoBatchNorm``.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        num_legos: int,
        num_active: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: Optional[nn.Module] = None,
        style: str = 'pytorch',
        with_cp: bool = False,
        norm_cfg: dict = dict(type='BN'),
        unit_norm: dict = dict()
    ) -> None:
        super().__init__()
        if planes % num_active:
            raise ValueError(f'block width {planes} is not divisible by '
                             f'num_active={num_active}')
        self.inplanes = inplanes
        self.planes = planes
        self.num_legos = num_legos
        self.unit_width = planes // num_active
        self.stride = stride
        self.dilation = dilation
        self.style = style
        self.with_cp = with_cp
        self.downsample = downsample
        self._build_layers(norm_cfg, unit_norm)

    def _build_layers(self, norm_cfg: dict, unit_norm: dict) -> None:
        """Add the block's convolutions and norms."""
        raise NotImplementedError

    def _inner(self, x: torch.Tensor, units: List[int], channels: torch.Tensor,
               gates: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, units: List[int],
                channels: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Run the block on ``x`` (B, C, H, W) with the route's ``units``
        (k ints), their ``channels`` and per-channel ``gates`` (k*u,)."""

        def _forward(x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self._inner(x, units, channels, gates)
            out += identity  # in place, as the stock blocks
            return out

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(_forward, x, use_reentrant=False)
        else:
            out = _forward(x)
        return F.relu(out, inplace=True)


class LegoBasicBlock(_LegoBlock):
    """ResNet basic block (two 3x3 convs) with lego units inside."""

    expansion = 1
    #: the norm whose affine carries the gates
    gated_norm = 'bn1'

    def _build_layers(self, norm_cfg: dict, unit_norm: dict) -> None:
        u, n, planes = self.unit_width, self.num_legos, self.planes
        self.conv1 = LegoConv2d(self.inplanes, u, 3, n, True, False, planes,
                                self.stride, self.dilation, self.dilation)
        self.bn1 = LegoBatchNorm(u, n, **unit_norm)
        self.conv2 = LegoConv2d(u, planes, 3, n, False, True, planes, 1, 1, 1)
        self.norm2_name, norm2 = build_norm_layer(norm_cfg, planes, postfix=2)
        self.add_module(self.norm2_name, norm2)

    @property
    def last_norm(self) -> nn.Module:
        return getattr(self, self.norm2_name)

    def _inner(self, x: torch.Tensor, units: List[int], channels: torch.Tensor,
               gates: torch.Tensor) -> torch.Tensor:
        out = F.relu(
            self.bn1(self.conv1(x, units), units, channels, gates),
            inplace=True)
        return self.last_norm(self.conv2(out, units))


class LegoBottleneck(_LegoBlock):
    """ResNet bottleneck block (1x1, 3x3, 1x1) with lego units inside."""

    expansion = 4
    gated_norm = 'bn2'

    def _build_layers(self, norm_cfg: dict, unit_norm: dict) -> None:
        conv1_stride, conv2_stride = ((1, self.stride) if self.style
                                      == 'pytorch' else (self.stride, 1))
        u, n, planes = self.unit_width, self.num_legos, self.planes
        out = planes * self.expansion
        self.conv1 = LegoConv2d(self.inplanes, u, 1, n, True, False, planes,
                                conv1_stride)
        self.bn1 = LegoBatchNorm(u, n, **unit_norm)
        self.conv2 = LegoConv2d(u, u, 3, n, True, True, planes, conv2_stride,
                                self.dilation, self.dilation)
        self.bn2 = LegoBatchNorm(u, n, **unit_norm)
        self.conv3 = LegoConv2d(u, out, 1, n, False, True, out)
        self.norm3_name, norm3 = build_norm_layer(norm_cfg, out, postfix=3)
        self.add_module(self.norm3_name, norm3)

    @property
    def last_norm(self) -> nn.Module:
        return getattr(self, self.norm3_name)

    def _inner(self, x: torch.Tensor, units: List[int], channels: torch.Tensor,
               gates: torch.Tensor) -> torch.Tensor:
        out = F.relu(
            self.bn1(self.conv1(x, units), units, channels), inplace=True)
        out = F.relu(
            self.bn2(self.conv2(out, units), units, channels, gates),
            inplace=True)
        return self.last_norm(self.conv3(out, units))
