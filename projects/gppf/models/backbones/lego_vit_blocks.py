"""Transformer encoder layers whose attention heads and MLP width are units.

Each layer holds two lego layers. Attention: a unit is a group of
``num_heads / num_active`` heads (its rows of q, k and v in the fused
``qkv`` with their biases, and the matching columns of ``proj``). MLP: a unit
is a slice of ``feedforward_channels / num_active`` hidden channels (rows of
``fc1`` with their bias, columns of ``fc2``). The LayerNorms, the biases of
``proj`` and ``fc2`` and the layer scales are shared. A task's gate scales a
unit's columns of ``proj`` / ``fc2``. Module names follow mmpretrain's
``TransformerEncoderLayer`` (``ln1``, ``attn.qkv``, ``attn.proj``, ``ln2``,
``ffn``); ``ffn.fc1`` / ``ffn.fc2`` stand for its ``ffn.layers.0.0`` /
``ffn.layers.1`` (:data:`DENSE_NAMES`).
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from mmcv.cnn import build_activation_layer
from mmcv.cnn.bricks import LayerScale as FFNLayerScale
from mmcv.cnn.bricks.drop import build_dropout
from mmpretrain.models.utils import LayerScale, build_norm_layer
from mmpretrain.models.utils.attention import scaled_dot_product_attention

from ..lego.linear_units import LegoLinear

__all__ = [
    'LegoAttention', 'LegoFFN', 'LegoTransformerEncoderLayer', 'DENSE_NAMES'
]

#: lego module name in a layer -> the stock mmpretrain module name
DENSE_NAMES: Dict[str, str] = {
    'attn.qkv': 'attn.qkv',
    'attn.proj': 'attn.proj',
    'ffn.fc1': 'ffn.layers.0.0',
    'ffn.fc2': 'ffn.layers.1',
}


def _drop_path(rate: float) -> nn.Module:
    return build_dropout(dict(type='DropPath', drop_prob=float(rate)))


class LegoAttention(nn.Module):
    """Multi-head self-attention with head groups as lego units.

    Args:
        embed_dims (int): Token width C.
        num_heads (int): Heads of the stock (active) attention.
        num_legos (int): Units (N).
        num_active (int): Units a route activates (k); ``num_heads`` must
            divide into them.
        attn_drop, proj_drop, drop_path (float): As in mmpretrain's
            ``MultiheadAttention``.
        qkv_bias (bool): Bias of q, k, v.
        layer_scale_init_value (float): > 0 adds ``gamma1`` (shared).
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 num_legos: int,
                 num_active: int,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 drop_path: float = 0.,
                 qkv_bias: bool = True,
                 layer_scale_init_value: float = 0.) -> None:
        super().__init__()
        if num_heads % num_active or embed_dims % num_heads:
            raise ValueError(
                f'num_heads={num_heads} must divide into num_active='
                f'{num_active} head groups and embed_dims={embed_dims} into '
                'num_heads heads: choose num_active among the divisors of '
                f'num_heads (e.g. num_active=1) or another arch')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.heads_per_unit = num_heads // num_active
        width = self.heads_per_unit * self.head_dims
        self.qkv = LegoLinear(
            embed_dims, width, num_legos, num_active, True, 3, bias=qkv_bias)
        self.proj = LegoLinear(width, embed_dims, num_legos, num_active, False)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.out_drop = _drop_path(drop_path)
        self.gamma1 = LayerScale(
            embed_dims, layer_scale_init_value=layer_scale_init_value
        ) if layer_scale_init_value > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, units: Sequence[int],
                gates: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, C) through the head groups ``units`` (k ints) with
        their ``gates`` (k, ); returns (B, L, C) (before the residual)."""
        B, L, _ = x.shape
        heads = len(units) * self.heads_per_unit
        qkv = self.qkv(x,
                       units).reshape(B, L, 3, heads,
                                      self.head_dims).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn_drop = self.attn_drop if self.training else 0.
        x = scaled_dot_product_attention(q, k, v, dropout_p=attn_drop)
        x = x.transpose(1, 2).reshape(B, L, heads * self.head_dims)
        x = self.proj(x, units, gates)
        return self.out_drop(self.gamma1(self.proj_drop(x)))


class LegoFFN(nn.Module):
    """Two-layer MLP with hidden-channel slices as lego units.

    Args:
        embed_dims (int): Token width C.
        feedforward_channels (int): Hidden width of the stock (active) MLP;
            must divide into ``num_active`` units.
        num_legos, num_active (int): N and k.
        ffn_drop, drop_path (float): As in mmcv's ``FFN``.
        act_cfg (dict): Activation.
        layer_scale_init_value (float): > 0 adds ``gamma2`` (shared).
    """

    def __init__(self,
                 embed_dims: int,
                 feedforward_channels: int,
                 num_legos: int,
                 num_active: int,
                 ffn_drop: float = 0.,
                 drop_path: float = 0.,
                 act_cfg: dict = dict(type='GELU'),
                 layer_scale_init_value: float = 0.) -> None:
        super().__init__()
        if feedforward_channels % num_active:
            raise ValueError(
                f'feedforward_channels={feedforward_channels} must divide '
                f'into num_active={num_active} units: choose num_active '
                'among its divisors or another arch')
        width = feedforward_channels // num_active
        self.fc1 = LegoLinear(
            embed_dims, width, num_legos, num_active, True, init='xavier')
        self.act = build_activation_layer(act_cfg)
        self.drop = nn.Dropout(ffn_drop)
        self.fc2 = LegoLinear(
            width, embed_dims, num_legos, num_active, False, init='xavier')
        self.dropout_layer = _drop_path(drop_path)
        self.gamma2 = FFNLayerScale(
            embed_dims, scale=layer_scale_init_value
        ) if layer_scale_init_value > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, units: Sequence[int],
                gates: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """``identity + MLP(x)`` for ``x`` (B, L, C) through ``units``."""
        out = self.drop(self.act(self.fc1(x, units)))
        out = self.drop(self.fc2(out, units, gates))
        return identity + self.dropout_layer(self.gamma2(out))


class LegoTransformerEncoderLayer(nn.Module):
    """Pre-norm encoder layer (mmpretrain's ``TransformerEncoderLayer``)
    with lego attention and MLP; two lego layers (attention, then MLP).

    Args: as mmpretrain's ``TransformerEncoderLayer`` plus ``num_legos`` and
    ``num_active``. ``num_fcs`` must be 2 and ``ffn_type`` ``'origin'``.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 feedforward_channels: int,
                 num_legos: int,
                 num_active: int,
                 layer_scale_init_value: float = 0.,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.,
                 num_fcs: int = 2,
                 qkv_bias: bool = True,
                 ffn_type: str = 'origin',
                 act_cfg: dict = dict(type='GELU'),
                 norm_cfg: dict = dict(type='LN'),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__()
        if num_fcs != 2 or ffn_type != 'origin':
            raise ValueError(
                "LegoViT layers have a two-layer MLP (num_fcs=2, ffn_type="
                f"'origin'), got num_fcs={num_fcs}, ffn_type={ffn_type!r}")
        self.embed_dims = embed_dims
        self.ln1 = build_norm_layer(norm_cfg, embed_dims)
        self.attn = LegoAttention(embed_dims, num_heads, num_legos, num_active,
                                  attn_drop_rate, drop_rate, drop_path_rate,
                                  qkv_bias, layer_scale_init_value)
        self.ln2 = build_norm_layer(norm_cfg, embed_dims)
        self.ffn = LegoFFN(embed_dims, feedforward_channels, num_legos,
                           num_active, drop_rate, drop_path_rate, act_cfg,
                           layer_scale_init_value)

    def lego_linears(self) -> Dict[str, LegoLinear]:
        """The layer's lego linears by their name in the layer."""
        return {name: self.get_submodule(name) for name in DENSE_NAMES}

    def forward(self, x: torch.Tensor, attn_units: Sequence[int],
                attn_gates: torch.Tensor, ffn_units: Sequence[int],
                ffn_gates: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, C) -> (B, L, C) with the two routes' units."""
        x = x + self.attn(self.ln1(x), attn_units, attn_gates)
        return self.ffn(self.ln2(x), ffn_units, ffn_gates, identity=x)
