"""``LN2d``: LayerNorm over the channels of an (N, C, H, W) map.

The class is mmpretrain's ``LayerNorm2d``; mmpretrain registers it as
``'LN2d'`` in *its own* registry only, so mmcv's ``build_norm_layer`` does not
find it from an mmdet or mmseg scope (it looks in the current scope's
registry, then in mmengine's root ``MODELS``). Registering the same class in
the root ``MODELS`` makes ``norm_cfg=dict(type='LN2d')`` work in every scope
(ViTDet-style necks and heads); mmpretrain's scope still finds its own entry,
the same class.
"""
from mmengine.registry import MODELS
from mmpretrain.models.utils.norm import LayerNorm2d

__all__ = ['LN2d']

#: (N, C, H, W) -> (N, C, H, W), normalised over C; ``LN2d(num_channels,
#: eps=1e-5, elementwise_affine=True)`` as ``nn.LayerNorm``.
LN2d = LayerNorm2d


def _register() -> None:
    """Register ``LN2d`` in the root ``MODELS``, refusing to shadow another
    class already registered there under that name."""
    existing = MODELS.module_dict.get('LN2d')
    if existing is None:
        MODELS.register_module('LN2d', module=LN2d)
    elif existing is not LN2d:
        raise KeyError(
            "'LN2d' is already registered in mmengine's root MODELS as "
            f'{existing.__module__}.{existing.__qualname__}; projects.gppf '
            'registers mmpretrain.models.utils.norm.LayerNorm2d under it')


_register()
