"""SimpleFPN: the simple feature pyramid of ViTDet (Li et al., 2022).

A plain ViT has one stride-16 feature map. ViTDet builds a pyramid from it
alone: two stride-2 deconvolutions for stride 4, one for stride 8, the map
itself for stride 16 and a 2x2 max-pool for stride 32; then, per level, a
1x1 lateral and a 3x3 output :class:`~mmcv.cnn.ConvModule` (with norms, e.g.
``LN2d``). Extra levels are max-pooled from the last one, as in mmdet's
``FPN``, so the output is the tuple that mmdet's RPN and RoI heads take.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_norm_layer
from mmdet.registry import MODELS
from mmengine.model import BaseModule

from ..layers import LN2d  # noqa: F401  (registers 'LN2d')

__all__ = ['SimpleFPN']

#: output stride of each pyramid branch, relative to the input map's
_SCALES = (4.0, 2.0, 1.0, 0.5)


@MODELS.register_module()
class SimpleFPN(BaseModule):
    """Simple feature pyramid from a single ViT feature map.

    Args:
        backbone_channel (int): Channels C of the backbone's map.
        in_channels (Sequence[int]): Channels of the four pyramid branches
            (x4, x2, x1, x0.5 of the input resolution): must be
            ``[C // 4, C // 2, C, C]``, as in ViTDet's configs.
        out_channels (int): Channels of every output level.
        num_outs (int): Output levels (>= 4); levels past the fourth are
            max-pooled (kernel 1, stride 2) from the previous one.
        conv_cfg (dict, optional): Conv config of the 1x1 / 3x3 convs.
        norm_cfg (dict, optional): Norm of the convs and of the stride-4
            branch between its two deconvolutions, e.g.
            ``dict(type='LN2d', requires_grad=True)``.
        act_cfg (dict, optional): Activation of the 1x1 / 3x3 convs
            (ViTDet: none). The stride-4 branch always uses GELU.
        init_cfg (dict | list[dict], optional): Initialisation config.

    Shapes:
        input: (B, C, H, W) at stride s (16 for a ViT with patch 16), or a
            tuple / list of such maps (a backbone's outputs), of which the
            last is used.
        output: ``num_outs`` maps (B, out_channels, 4H / 2**i, 4W / 2**i)
            (rounded down), strides s / 4, s / 2, s, 2s, 4s, ...
    """

    def __init__(self,
                 backbone_channel: int,
                 in_channels: Sequence[int],
                 out_channels: int,
                 num_outs: int,
                 conv_cfg: Optional[dict] = None,
                 norm_cfg: Optional[dict] = None,
                 act_cfg: Optional[dict] = None,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg)
        C = backbone_channel
        expected = [C // 4, C // 2, C, C]
        if C % 4 or list(in_channels) != expected:
            raise ValueError(
                f'SimpleFPN with backbone_channel={C} builds branches of '
                f'{expected} channels (C divisible by 4); got in_channels='
                f'{list(in_channels)}')
        if num_outs < len(_SCALES):
            raise ValueError(f'num_outs must be >= {len(_SCALES)}, got '
                             f'{num_outs}')
        self.backbone_channel = C
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs

        mid = [nn.ConvTranspose2d(C, C // 2, 2, stride=2)]
        if norm_cfg is not None:
            mid.append(build_norm_layer(norm_cfg, C // 2)[1])
        self.branches = nn.ModuleList([
            nn.Sequential(*mid, nn.GELU(),
                          nn.ConvTranspose2d(C // 2, C // 4, 2, stride=2)),
            nn.Sequential(nn.ConvTranspose2d(C, C // 2, 2, stride=2)),
            nn.Identity(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        ])
        conv = dict(
            conv_cfg=conv_cfg,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg,
            inplace=False)
        self.lateral_convs = nn.ModuleList(
            ConvModule(c, out_channels, 1, **conv) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1, **conv)
            for _ in in_channels)

    def forward(
        self, inputs: Union[torch.Tensor, Sequence[torch.Tensor]]
    ) -> Tuple[torch.Tensor, ...]:
        """Args: inputs (B, C, H, W), or the backbone's tuple (last used).
        Returns: tuple of ``num_outs`` maps, finest first."""
        x = inputs if isinstance(inputs, torch.Tensor) else inputs[-1]
        if x.dim() != 4 or x.shape[1] != self.backbone_channel:
            raise ValueError(
                f'SimpleFPN expects a (B, {self.backbone_channel}, H, W) '
                f'map, got {tuple(x.shape)}')
        outs = [
            fpn(lateral(branch(x))) for branch, lateral, fpn in zip(
                self.branches, self.lateral_convs, self.fpn_convs)
        ]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)
