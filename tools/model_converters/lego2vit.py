"""Extract a task's sub-network of a LegoViT as a stock ViT checkpoint.

The task's noise-free (or frozen) route picks k units per lego layer (head
groups, MLP hidden slices); their slices are gathered into dense tensors with
the stock mmpretrain ``VisionTransformer`` key names and shapes, the task's
gates folded into ``attn.proj`` and ``ffn.layers.1``. The output loads with
no missing or unexpected key into

    backbone=dict(type='VisionTransformer', arch=..., ...,  # printed here
                  init_cfg=dict(type='Pretrained', prefix='backbone.',
                                checkpoint='OUT.pth'))

Usage:
    python tools/model_converters/lego2vit.py CKPT TASK OUT.pth \
        [--prefix backbone.]
"""
import os.path as osp
import sys

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from _lego_export import lego_extra_state, main, save_export  # noqa: E402

from projects.gppf.models import LegoViT, lego  # noqa: E402


def convert(checkpoint: str,
            task: str,
            out: str,
            prefix: str = 'backbone.') -> dict:
    """Write ``task``'s sub-network of ``checkpoint`` to ``out``; returns
    the metadata saved with it (route, gates, stock backbone arguments)."""
    state = lego.read_vit_state_dict(checkpoint, prefix)
    extra = lego_extra_state(state, checkpoint, prefix, 'LegoViT', task)
    layout = extra['lego_layout']
    arch = {
        k: layout[k]
        for k in ('embed_dims', 'num_layers', 'num_heads',
                  'feedforward_channels')
    }
    backbone = LegoViT(
        arch,
        num_legos=layout['num_legos'],
        num_active=layout['num_active'],
        tasks=layout['tasks'],
        **extra['vit_args'])
    backbone.load_state_dict(state, strict=True)
    dense = lego.extract_vit_task_state_dict(backbone, task)
    return save_export(backbone, task, checkpoint, out, dense,
                       backbone.stock_args())


def _summary(meta: dict) -> str:
    return ("; stock backbone: dict(type='VisionTransformer', "
            f"**{meta['stock_backbone']})")


if __name__ == '__main__':
    main(__doc__, 'LegoViT', convert, _summary)
