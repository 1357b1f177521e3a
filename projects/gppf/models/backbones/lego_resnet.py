"""LegoResNet: a ResNet whose residual blocks hold task-routed lego units.

Drop-in for ``mmdet.ResNet``, ``mmseg.ResNetV1c`` and ``mmpretrain.ResNet``:
same arguments and outputs, plus ``num_legos``, ``num_active``, ``tasks`` and
``task``. Each block is one lego layer; a task's route picks ``num_active`` of
its ``num_legos`` units. With the default shape (``num_active=2``) a task's
active width equals the stock ResNet's, so its sub-network *is* a stock ResNet
(see :mod:`projects.gppf.models.lego.convert`) and costs what it costs.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from ...utils.compat import BatchNormBase
from ..checked_pretrained import PRETRAINED_TYPES
from ..lego.backbone_mixin import LegoBackboneMixin
from ..lego.convert import load_dense_or_lego, read_state_dict
from ..lego.layers import LegoBatchNorm, LegoConv2d, route_channels
from ..lego.task_norm import (TaskNormMixin, affine_biases, affine_weights,
                              task_norm_cfg)
from .lego_resnet_blocks import LegoBasicBlock, LegoBottleneck

__all__ = ['LegoResNet']

_UNIT_NORMS = ('BN', 'BN2d', 'SyncBN')
_TASK_NORM = ('stats', 'affine', 'shared')
# Stock ResNet arguments accepted only when they are switched off.
_OFF_ARGS = {
    'dcn': (None, ),
    'stage_with_dcn': ((False, ) * 4, [False] * 4),
    'plugins': (None, []),
    'drop_path_rate': (0, 0.0),
    'expansion': (None, 1, 4),
}


@MODELS.register_module()
class LegoResNet(LegoBackboneMixin, BaseModule):
    """ResNet backbone with lego units in every residual block.

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        num_legos (int): Units per lego layer (N). Default: 4.
        num_active (int): Units a task activates per layer (k). The unit
            width is ``block width / k``, so the active width always equals
            the stock ResNet's. Default: 2.
        tasks (Sequence[str]): Task names the router routes.
            Default: ``('default', )``.
        task (str, optional): Task used when no :func:`use_task` context is
            active (downstream use of a pre-trained lego backbone).
        router (dict): Extra arguments of :class:`TaskRouter`
            (``temperature``, ``noise_std``, ``balance_weight``, ...).
        task_norm (str, optional): What the batch norms keep per task:
            ``'stats'`` (running statistics; affine shared), ``'affine'``
            (statistics and the shared norms' affine) or ``'shared'``
            (nothing: one set for all tasks). The active task's set is used
            in training and in evaluation. Default: ``'stats'`` with
            several tasks, else ``'shared'``.
        in_channels, stem_channels, base_channels, num_stages, strides,
        dilations, out_indices, style, deep_stem, avg_down, frozen_stages,
        conv_cfg, norm_cfg, norm_eval, with_cp, zero_init_residual,
        contract_dilation, multi_grid, init_cfg: As in mmdet/mmseg ``ResNet``.
            ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix=...)``
            loads a LegoResNet checkpoint or inflates a dense ResNet one
            (torchvision or OpenMMLab keys) into the units; with
            ``task_map=dict(<task>=<checkpoint task>)`` a task the
            checkpoint never saw starts from that task's route and norm
            statistics.

    Lego units keep per-unit BatchNorm statistics (per task and unit with
    ``task_norm`` not ``'shared'``; see :mod:`.task_norm`); with ``SyncBN``
    the shared norms synchronise and the unit norms stay per-rank.
    """

    arch_settings = {
        18: (LegoBasicBlock, (2, 2, 2, 2)),
        34: (LegoBasicBlock, (3, 4, 6, 3)),
        50: (LegoBottleneck, (3, 4, 6, 3)),
        101: (LegoBottleneck, (3, 4, 23, 3)),
        152: (LegoBottleneck, (3, 8, 36, 3))
    }

    def __init__(self,
                 depth: int,
                 num_legos: int = 4,
                 num_active: int = 2,
                 tasks: Sequence[str] = ('default', ),
                 task: Optional[str] = None,
                 router: Optional[dict] = None,
                 task_norm: Optional[str] = None,
                 in_channels: int = 3,
                 stem_channels: Optional[int] = None,
                 base_channels: int = 64,
                 num_stages: int = 4,
                 strides: Sequence[int] = (1, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1),
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 style: str = 'pytorch',
                 deep_stem: bool = False,
                 avg_down: bool = False,
                 frozen_stages: int = -1,
                 conv_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 zero_init_residual: bool = True,
                 contract_dilation: bool = False,
                 multi_grid: Optional[Sequence[int]] = None,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None,
                 **unsupported) -> None:
        if pretrained is not None:
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg)
        for key, value in unsupported.items():
            if key not in _OFF_ARGS:
                raise TypeError(
                    f'LegoResNet got an unexpected argument {key!r}')
            if value not in _OFF_ARGS[key]:
                raise ValueError(
                    f'LegoResNet does not support {key}={value!r}')
        if depth not in self.arch_settings:
            raise KeyError(f'invalid depth {depth} for LegoResNet, expected '
                           f'one of {sorted(self.arch_settings)}')
        if style not in ('pytorch', 'caffe'):
            raise ValueError(
                f"style must be 'pytorch' or 'caffe', got {style}")
        if not 1 <= num_stages <= 4:
            raise ValueError(f'num_stages must be in [1, 4], got {num_stages}')
        if max(out_indices) >= num_stages:
            raise ValueError(f'out_indices {tuple(out_indices)} exceed '
                             f'num_stages={num_stages}')
        if conv_cfg not in (None, dict(type='Conv2d'), dict(type='Conv')):
            raise ValueError(f'LegoResNet supports plain convs only, got '
                             f'conv_cfg={conv_cfg}')
        if norm_cfg['type'] not in _UNIT_NORMS:
            raise ValueError(f'lego units keep per-unit BatchNorm statistics: '
                             f'norm_cfg type must be one of {_UNIT_NORMS}, '
                             f"got {norm_cfg['type']!r}")
        tasks = self._check_routing(num_legos, num_active, tasks, task)
        if task_norm is None:
            task_norm = 'stats' if len(tasks) > 1 else 'shared'
        if task_norm not in _TASK_NORM:
            raise ValueError(f'task_norm must be one of {_TASK_NORM}, got '
                             f'{task_norm!r}')
        self.task_norm = task_norm
        self.depth = depth
        self.stem_channels = stem_channels or base_channels
        self.base_channels = base_channels
        self.num_stages = num_stages
        self.strides = tuple(strides)
        self.dilations = tuple(dilations)
        self.out_indices = tuple(out_indices)
        self.style = style
        self.deep_stem = deep_stem
        self.avg_down = avg_down
        self.frozen_stages = frozen_stages
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg if task_norm == 'shared' else task_norm_cfg(
            norm_cfg, len(tasks), task_norm == 'affine')
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.zero_init_residual = zero_init_residual
        self.block, stage_blocks = self.arch_settings[depth]
        self.stage_blocks = stage_blocks[:num_stages]
        unit_norm = dict(
            eps=norm_cfg.get('eps', 1e-5),
            momentum=norm_cfg.get('momentum', 0.1),
            requires_grad=norm_cfg.get('requires_grad', True),
            num_tasks=None if task_norm == 'shared' else len(tasks))

        self._make_stem(in_channels, self.stem_channels)
        self.res_layers: List[str] = []
        self.unit_widths: List[int] = []
        inplanes = self.stem_channels
        for i, num_blocks in enumerate(self.stage_blocks):
            planes = base_channels * 2**i
            grid = multi_grid if i == num_stages - 1 else None
            layer = self._make_layer(inplanes, planes, num_blocks,
                                     self.strides[i], self.dilations[i],
                                     contract_dilation, grid, unit_norm)
            self.add_module(f'layer{i + 1}', layer)
            self.res_layers.append(f'layer{i + 1}')
            self.unit_widths.append(planes // num_active)
            inplanes = planes * self.block.expansion
        self.stage_channels = tuple(base_channels * 2**i * self.block.expansion
                                    for i in range(num_stages))
        #: channels of each output, in ``out_indices`` order
        self.out_channels = tuple(self.stage_channels[i] for i in out_indices)
        self.feat_dim = self.stage_channels[-1]
        self._build_router(tasks, sum(self.stage_blocks), router)
        #: the norms that keep statistics per task, told the active task
        self.task_norm_modules = [
            m for m in self.modules() if isinstance(m, TaskNormMixin) or (
                isinstance(m, LegoBatchNorm) and m.num_tasks is not None)
        ]
        self._freeze_stages()

    # ------------------------------------------------------------ building
    def _make_stem(self, in_channels: int, stem_channels: int) -> None:
        if self.deep_stem:
            half = stem_channels // 2
            layers = []
            shapes = ((in_channels, half), (half, half), (half, stem_channels))
            for i, (cin, cout) in enumerate(shapes):
                layers += [
                    build_conv_layer(
                        self.conv_cfg,
                        cin,
                        cout,
                        3,
                        2 if i == 0 else 1,
                        1,
                        bias=False),
                    build_norm_layer(self.norm_cfg, cout)[1],
                    nn.ReLU(inplace=True)
                ]
            self.stem = nn.Sequential(*layers)
        else:
            self.conv1 = build_conv_layer(
                self.conv_cfg, in_channels, stem_channels, 7, 2, 3, bias=False)
            self.norm1_name, norm1 = build_norm_layer(
                self.norm_cfg, stem_channels, postfix=1)
            self.add_module(self.norm1_name, norm1)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def _make_layer(self, inplanes: int, planes: int, num_blocks: int,
                    stride: int, dilation: int, contract_dilation: bool,
                    multi_grid: Optional[Sequence[int]],
                    unit_norm: dict) -> nn.Sequential:
        out_planes = planes * self.block.expansion
        downsample = None
        if stride != 1 or inplanes != out_planes:
            layers = []
            conv_stride = stride
            if self.avg_down and stride != 1:
                conv_stride = 1
                layers.append(
                    nn.AvgPool2d(
                        stride,
                        stride,
                        ceil_mode=True,
                        count_include_pad=False))
            layers += [
                build_conv_layer(
                    self.conv_cfg,
                    inplanes,
                    out_planes,
                    1,
                    conv_stride,
                    bias=False),
                build_norm_layer(self.norm_cfg, out_planes)[1]
            ]
            downsample = nn.Sequential(*layers)
        blocks = []
        for j in range(num_blocks):
            if multi_grid is not None:
                block_dilation = dilation * multi_grid[j]
            elif j == 0 and contract_dilation and dilation > 1:
                block_dilation = dilation // 2
            else:
                block_dilation = dilation
            blocks.append(
                self.block(
                    inplanes if j == 0 else out_planes,
                    planes,
                    self.num_legos,
                    self.num_active,
                    stride=stride if j == 0 else 1,
                    dilation=block_dilation,
                    downsample=downsample if j == 0 else None,
                    style=self.style,
                    with_cp=self.with_cp,
                    norm_cfg=self.norm_cfg,
                    unit_norm=unit_norm))
        return nn.Sequential(*blocks)

    @property
    def norm1(self) -> nn.Module:
        return getattr(self, self.norm1_name)

    def blocks(self) -> List[nn.Module]:
        """All lego blocks, in lego-layer order."""
        return [b for name in self.res_layers for b in getattr(self, name)]

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Args: x (B, C, H, W). Returns the ``out_indices`` feature maps,
        ``(B, out_channels[i], H / 2**(i+2), W / 2**(i+2))`` at stride 1/2/2/2.
        """
        task = self.active_task()
        route = self.router(task)
        units = route.indices.tolist()  # the one host sync of the route
        task_index = self.router.task_index(task)
        for norm in self.task_norm_modules:
            norm.task_index = task_index
        if self.deep_stem:
            x = self.stem(x)
        else:
            x = self.relu(self.norm1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        first = 0
        for i, name in enumerate(self.res_layers):
            layer = getattr(self, name)
            last = first + len(layer)
            width = self.unit_widths[i]
            channels = route_channels(route.indices[first:last], width)
            gates = route.gates[first:last].repeat_interleave(width, dim=1)
            for j, block in enumerate(layer):
                x = block(x, units[first + j], channels[j], gates[j])
            first = last
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    # ------------------------------------------------------------ training
    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        stem = [self.stem] if self.deep_stem else [self.conv1, self.norm1]
        stages = [
            getattr(self, f'layer{i}')
            for i in range(1, self.frozen_stages + 1)
        ]
        for module in stem + stages:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'LegoResNet':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, (BatchNormBase, LegoBatchNorm)):
                    m.eval()
        return self

    # ------------------------------------------------------------ weights
    def init_weights(self) -> None:
        """Kaiming init (lego convs at their active fan), or load/inflate a
        checkpoint given by ``init_cfg=dict(type='Pretrained', ...)`` (or
        ``'CheckedPretrained'``)."""
        if self.init_cfg is not None and self.init_cfg.get(
                'type') in PRETRAINED_TYPES:
            state = read_state_dict(self.init_cfg['checkpoint'],
                                    self.init_cfg.get('prefix'))
            load_dense_or_lego(self, state, self.init_cfg.get('task_map'))
            print_log(
                f'LegoResNet loaded {self.init_cfg["checkpoint"]}',
                logger='current')
        else:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(
                        m.weight, mode='fan_out', nonlinearity='relu')
                elif isinstance(m, (LegoConv2d, LegoBatchNorm)):
                    m.reset_parameters()
                elif isinstance(m, (BatchNormBase, nn.GroupNorm)):
                    for weight in affine_weights(m):
                        nn.init.constant_(weight, 1)
                    for bias in affine_biases(m):
                        nn.init.constant_(bias, 0)
            if self.zero_init_residual:
                for block in self.blocks():
                    for weight in affine_weights(block.last_norm):
                        nn.init.constant_(weight, 0)
            self.router.reset_logits()
        self.is_init = True

    def lego_layout(self) -> Dict[str, object]:
        """What a checkpoint of this backbone must match to load."""
        return dict(
            depth=self.depth,
            num_stages=self.num_stages,
            base_channels=self.base_channels,
            stem_channels=self.stem_channels,
            deep_stem=self.deep_stem,
            avg_down=self.avg_down,
            num_legos=self.num_legos,
            num_active=self.num_active,
            tasks=list(self.tasks),
            task_norm=self.task_norm)

    def _upgrade_layout(self, given: dict) -> dict:
        """A checkpoint from before per-task norms keeps one set of
        statistics, which the norms replicate over the tasks."""
        if 'task_norm' in given:
            return given
        given = dict(given, task_norm='shared')
        if self.task_norm != 'shared':
            print_log(
                'LegoResNet: the checkpoint keeps one set of norm '
                'statistics for all tasks; replicated per task '
                f'(task_norm={self.task_norm!r})',
                logger='current')
            given['task_norm'] = self.task_norm
        return given
