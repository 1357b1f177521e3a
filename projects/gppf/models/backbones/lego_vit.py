"""LegoViT: a Vision Transformer whose layers hold task-routed lego units.

Drop-in for mmpretrain's ``VisionTransformer`` (same arguments and outputs;
mmseg's argument names are accepted too), plus ``num_legos``, ``num_active``,
``tasks``, ``task`` and ``router``. Every encoder layer holds two lego layers
(attention head groups, then MLP hidden slices; see
:mod:`.lego_vit_blocks`); a task's route picks ``num_active`` of the
``num_legos`` units of each. Units are sized so that the active width equals
the stock arch's: with the default shape a task's sub-network *is* a stock
``VisionTransformer`` (see :mod:`projects.gppf.models.lego.vit_convert`) and
costs what it costs.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks.transformer import PatchEmbed
from mmengine.logging import print_log
from mmengine.model import BaseModule, ModuleList
from mmengine.model.weight_init import initialize, trunc_normal_
from mmengine.registry import MODELS
from mmpretrain.models.backbones import VisionTransformer
from mmpretrain.models.utils import (build_norm_layer, resize_pos_embed,
                                     to_2tuple)

from ..checked_pretrained import PRETRAINED_TYPES
from ..lego.backbone_mixin import LegoBackboneMixin
from ..lego.linear_units import LegoLinear
from ..lego.packed_state import pack_state
from ..lego.vit_convert import load_vit_dense_or_lego, read_vit_state_dict
from .lego_vit_blocks import LegoTransformerEncoderLayer

__all__ = ['LegoViT']

_ARCH_KEYS = ('embed_dims', 'num_layers', 'num_heads', 'feedforward_channels')
# mmseg ``VisionTransformer`` arguments (besides the shared ones).
_MMSEG_ARCH = ('embed_dims', 'num_layers', 'num_heads', 'mlp_ratio')
# mmseg arguments accepted only with these values.
_MMSEG_OFF = {
    'out_origin': (False, ),
    'output_cls_token': (False, ),
    'frozen_exclude': (None, [], ())
}


@MODELS.register_module()
class LegoViT(LegoBackboneMixin, BaseModule):
    """Vision Transformer with lego units in every encoder layer.

    Args:
        arch (str | dict): A ``VisionTransformer.arch_zoo`` name or a dict
            with ``embed_dims``, ``num_layers``, ``num_heads`` and
            ``feedforward_channels``. Default: ``'base'``.
        num_legos (int): Units per lego layer (N). Default: 4.
        num_active (int): Units a task activates per lego layer (k);
            ``num_heads`` and ``feedforward_channels`` must divide by it.
            The active width always equals the stock arch's. Default: 2.
        tasks (Sequence[str]): Task names the router routes.
            Default: ``('default', )``.
        task (str, optional): Task used when no :func:`use_task` context is
            active (downstream use of a pre-trained lego backbone).
        router (dict): Extra arguments of :class:`TaskRouter`.
        img_size, patch_size, in_channels, out_indices, drop_rate,
        drop_path_rate, qkv_bias, norm_cfg, final_norm, out_type,
        with_cls_token, frozen_stages, interpolate_mode,
        layer_scale_init_value, patch_cfg, layer_cfgs, pre_norm, init_cfg:
            As in mmpretrain's ``VisionTransformer``.
            ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix=...)``
            loads a LegoViT checkpoint or inflates a dense ViT one
            (mmpretrain, or timm / MAE key names) into the units; with
            ``task_map=dict(<task>=<checkpoint task>)`` a task the
            checkpoint never saw starts from that task's route.
        with_cp (bool): Checkpoint each layer's activations (mmseg).
        embed_dims, num_layers, num_heads, mlp_ratio, act_cfg,
        attn_drop_rate, num_fcs, patch_norm, patch_bias, patch_pad,
        norm_eval, pretrained: mmseg's ``VisionTransformer`` names; with
            them the outputs default to mmseg's (``out_type='featmap'``,
            ``final_norm=False``, no patch embedding bias).

    Frozen layers (``frozen_stages``) also stop the router's gradient
    through their gates. Per-task norm statistics do not apply: the
    LayerNorms keep no running statistics, so every task shares them.
    """

    arch_zoo = VisionTransformer.arch_zoo
    num_extra_tokens = 1
    OUT_TYPES = VisionTransformer.OUT_TYPES
    #: LayerNorms keep nothing per task (see the class docstring)
    task_norm = None

    def __init__(self,
                 arch: Union[str, dict] = 'base',
                 num_legos: int = 4,
                 num_active: int = 2,
                 tasks: Sequence[str] = ('default', ),
                 task: Optional[str] = None,
                 router: Optional[dict] = None,
                 img_size: Union[int, Tuple[int, int]] = 224,
                 patch_size: int = 16,
                 in_channels: int = 3,
                 out_indices: Union[int, Sequence[int]] = -1,
                 drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 qkv_bias: bool = True,
                 norm_cfg: dict = dict(type='LN', eps=1e-6),
                 final_norm: Optional[bool] = None,
                 out_type: Optional[str] = None,
                 with_cls_token: bool = True,
                 frozen_stages: int = -1,
                 interpolate_mode: str = 'bicubic',
                 layer_scale_init_value: float = 0.,
                 patch_cfg: dict = dict(),
                 layer_cfgs: Union[dict, Sequence[dict]] = dict(),
                 pre_norm: bool = False,
                 with_cp: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None,
                 **mmseg_args) -> None:
        arch, mmseg, layer_cfgs, patch_cfg, init_cfg = self._mmseg_args(
            arch, mmseg_args, layer_cfgs, patch_cfg, init_cfg)
        super().__init__(init_cfg)
        if isinstance(arch, str):
            if arch.lower() not in self.arch_zoo:
                raise KeyError(f'unknown arch {arch!r}: choose one of '
                               f'{sorted(set(self.arch_zoo))} or give a dict '
                               f'with {_ARCH_KEYS}')
            arch = self.arch_zoo[arch.lower()]
        elif not isinstance(arch, dict) or not set(_ARCH_KEYS) <= set(arch):
            raise ValueError(f'a custom arch is a dict with {_ARCH_KEYS}, '
                             f'got {arch!r}')
        out_type = out_type or ('featmap' if mmseg else 'cls_token')
        final_norm = (not mmseg) if final_norm is None else final_norm
        if out_type not in self.OUT_TYPES:
            raise ValueError(
                f'out_type must be one of {sorted(self.OUT_TYPES)}'
                f', got {out_type!r}')
        if out_type == 'cls_token' and not with_cls_token:
            raise ValueError("out_type='cls_token' needs with_cls_token=True")
        tasks = self._check_routing(num_legos, num_active, tasks, task)
        self.arch_settings = {k: arch[k] for k in _ARCH_KEYS}
        self.embed_dims = arch['embed_dims']
        self.num_layers = arch['num_layers']
        self.img_size = to_2tuple(img_size)
        self.out_type = out_type
        self.with_cls_token = with_cls_token
        self.final_norm = final_norm
        self.frozen_stages = frozen_stages
        self.interpolate_mode = interpolate_mode
        self.with_cp = with_cp
        self._vit_args = dict(
            img_size=list(self.img_size),
            patch_size=patch_size,
            in_channels=in_channels,
            qkv_bias=qkv_bias,
            final_norm=final_norm,
            out_type=out_type,
            with_cls_token=with_cls_token,
            layer_scale_init_value=layer_scale_init_value,
            pre_norm=pre_norm)
        if patch_cfg:  # mmseg's arguments set it (e.g. no patch bias)
            self._vit_args['patch_cfg'] = dict(patch_cfg)

        _patch_cfg = dict(
            in_channels=in_channels,
            input_size=img_size,
            embed_dims=self.embed_dims,
            conv_type='Conv2d',
            kernel_size=patch_size,
            stride=patch_size,
            bias=not pre_norm)
        _patch_cfg.update(patch_cfg)
        self.patch_embed = PatchEmbed(**_patch_cfg)
        self.patch_resolution = self.patch_embed.init_out_size
        num_patches = self.patch_resolution[0] * self.patch_resolution[1]
        if with_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dims))
        else:
            self.cls_token = None
            self.num_extra_tokens = 0
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + self.num_extra_tokens,
                        self.embed_dims))
        self._register_load_state_dict_pre_hook(self._prepare_pos_embed)
        self.drop_after_pos = nn.Dropout(p=drop_rate)

        if isinstance(out_indices, int):
            out_indices = [out_indices]
        self.out_indices = [
            i + self.num_layers if i < 0 else i for i in out_indices
        ]
        if not all(0 <= i < self.num_layers for i in self.out_indices):
            raise ValueError(f'out_indices {tuple(out_indices)} must lie in '
                             f'[-{self.num_layers}, {self.num_layers})')
        #: channels of each output, in ``out_indices`` order
        self.out_channels = (self.embed_dims, ) * len(self.out_indices)

        dpr = np.linspace(0, drop_path_rate, self.num_layers)
        if isinstance(layer_cfgs, dict):
            layer_cfgs = [layer_cfgs] * self.num_layers
        self.layers = ModuleList()
        for i in range(self.num_layers):
            cfg = dict(
                embed_dims=self.embed_dims,
                num_heads=arch['num_heads'],
                feedforward_channels=arch['feedforward_channels'],
                layer_scale_init_value=layer_scale_init_value,
                drop_rate=drop_rate,
                drop_path_rate=float(dpr[i]),
                qkv_bias=qkv_bias,
                norm_cfg=norm_cfg)
            cfg.update(layer_cfgs[i])
            self.layers.append(
                LegoTransformerEncoderLayer(
                    num_legos=num_legos, num_active=num_active, **cfg))
        self.pre_norm = build_norm_layer(
            norm_cfg, self.embed_dims) if pre_norm else nn.Identity()
        if final_norm:
            self.ln1 = build_norm_layer(norm_cfg, self.embed_dims)
        if out_type == 'avg_featmap':
            self.ln2 = build_norm_layer(norm_cfg, self.embed_dims)
        self._build_router(tasks, 2 * self.num_layers, router)
        self._freeze_stages()

    @staticmethod
    def _mmseg_args(arch, args: dict, layer_cfgs, patch_cfg, init_cfg):
        """Map mmseg's ``VisionTransformer`` arguments onto ours."""
        mmseg = bool(args)
        for key, allowed in _MMSEG_OFF.items():
            if key in args and args.pop(key) not in allowed:
                raise ValueError(f'LegoViT does not support {key} other '
                                 f'than {allowed[0]!r}')
        if any(k in args for k in _MMSEG_ARCH):
            embed = args.pop('embed_dims', 768)
            arch = dict(
                embed_dims=embed,
                num_layers=args.pop('num_layers', 12),
                num_heads=args.pop('num_heads', 12),
                feedforward_channels=int(args.pop('mlp_ratio', 4) * embed))
        extra = {  # per-layer arguments
            k: args.pop(k)
            for k in ('act_cfg', 'num_fcs', 'attn_drop_rate') if k in args
        }
        if extra:
            layer_cfgs = ([dict(c, **extra) for c in layer_cfgs] if isinstance(
                layer_cfgs, (list, tuple)) else dict(layer_cfgs, **extra))
        if args.pop('patch_norm', False):
            patch_cfg = dict(patch_cfg, norm_cfg=dict(type='LN', eps=1e-6))
        if mmseg:  # mmseg's patch embedding: no bias unless asked for
            patch_cfg = dict(
                dict(bias=args.pop('patch_bias', False)), **patch_cfg)
        if 'patch_pad' in args:
            patch_cfg = dict(patch_cfg, padding=args.pop('patch_pad'))
        args.pop('norm_eval', None)  # LayerNorms keep no statistics
        pretrained = args.pop('pretrained', None)
        if pretrained is not None:
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        if args:
            raise TypeError(f'LegoViT got unexpected arguments {sorted(args)}')
        return arch, mmseg, layer_cfgs, patch_cfg, init_cfg

    @property
    def norm1(self) -> nn.Module:
        return self.ln1

    @property
    def norm2(self) -> nn.Module:
        return self.ln2

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Args: x (B, C, H, W). Returns one output per ``out_indices``:
        ``raw`` (B, L, C), ``cls_token`` / ``avg_featmap`` (B, C) or
        ``featmap`` (B, C, H / patch, W / patch)."""
        route = self.router(self.active_task())
        units = route.indices.tolist()  # the one host sync of the route
        gates = route.gates
        frozen = 2 * max(self.frozen_stages, 0)
        if frozen:
            gates = torch.cat([gates[:frozen].detach(), gates[frozen:]])
        B = x.shape[0]
        x, patch_resolution = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + resize_pos_embed(
            self.pos_embed,
            self.patch_resolution,
            patch_resolution,
            mode=self.interpolate_mode,
            num_extra_tokens=self.num_extra_tokens)
        x = self.pre_norm(self.drop_after_pos(x))
        outs = []
        for i, layer in enumerate(self.layers):
            a, f = 2 * i, 2 * i + 1
            args = (units[a], gates[a], units[f], gates[f])
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(layer, x, *args, use_reentrant=False)
            else:
                x = layer(x, *args)
            if i == len(self.layers) - 1 and self.final_norm:
                x = self.ln1(x)
            if i in self.out_indices:
                outs.append(self._format_output(x, patch_resolution))
        return tuple(outs)

    _format_output = VisionTransformer._format_output
    get_layer_depth = VisionTransformer.get_layer_depth

    # ------------------------------------------------------------ training
    def _freeze_stages(self) -> None:
        if self.frozen_stages <= 0:
            return
        frozen = [self.patch_embed, self.pre_norm, self.drop_after_pos]
        frozen += list(self.layers[:self.frozen_stages])
        if self.frozen_stages == self.num_layers:
            frozen += [
                getattr(self, n) for n in ('ln1', 'ln2') if hasattr(self, n)
            ]
        for param in (self.pos_embed, self.cls_token):
            if param is not None:
                param.requires_grad = False
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'LegoViT':
        super().train(mode)
        self._freeze_stages()
        return self

    # ------------------------------------------------------------ weights
    def init_weights(self) -> None:
        """mmpretrain's ViT init (lego linears as slices of the active
        dense layer), or load/inflate ``init_cfg=dict(type='Pretrained')``.
        """
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') in PRETRAINED_TYPES:
            state = read_vit_state_dict(cfg['checkpoint'], cfg.get('prefix'))
            load_vit_dense_or_lego(self, state, cfg.get('task_map'))
            print_log(f'LegoViT loaded {cfg["checkpoint"]}', logger='current')
        else:
            if self.init_cfg:  # e.g. Kaiming for the patch embedding
                initialize(self, self.init_cfg)
            for m in self.modules():
                if isinstance(m, LegoLinear):
                    m.reset_parameters()
            trunc_normal_(self.pos_embed, std=0.02)
            self.router.reset_logits()
        self.is_init = True

    def _prepare_pos_embed(self, state_dict: dict, prefix: str, *args,
                           **kwargs) -> None:
        """Resize a checkpoint's ``pos_embed`` to this backbone's grid."""
        name = prefix + 'pos_embed'
        if name not in state_dict:
            return
        value = state_dict[name]
        if not self.with_cls_token and \
                value.shape[1] == self.pos_embed.shape[1] + 1:
            value = value[:, 1:]
        if value.shape != self.pos_embed.shape:
            print_log(
                f'LegoViT: resize pos_embed from {tuple(value.shape)} to '
                f'{tuple(self.pos_embed.shape)}',
                logger='current')
            side = int(np.sqrt(value.shape[1] - self.num_extra_tokens))
            value = resize_pos_embed(value, (side, side),
                                     self.patch_resolution,
                                     self.interpolate_mode,
                                     self.num_extra_tokens)
        state_dict[name] = value

    def lego_layout(self) -> Dict[str, object]:
        """What a checkpoint of this backbone must match to load."""
        return dict(
            backbone='LegoViT',
            **self.arch_settings,
            num_legos=self.num_legos,
            num_active=self.num_active,
            tasks=list(self.tasks),
            task_norm=self.task_norm)

    def stock_args(self) -> Dict[str, object]:
        """Arguments of the stock ``VisionTransformer`` (and of a LegoViT)
        that hold this backbone's tensors."""
        return dict(arch=dict(self.arch_settings), **self._vit_args)

    def get_extra_state(self) -> torch.Tensor:
        return pack_state(
            dict(lego_layout=self.lego_layout(), vit_args=self._vit_args))
