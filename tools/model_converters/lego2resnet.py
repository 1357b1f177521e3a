"""Extract a task's sub-network of a LegoResNet as a stock ResNet checkpoint.

The task's noise-free (or frozen) route picks k units per lego layer; their
slices are gathered into dense tensors with stock ``ResNet`` key names and
shapes, the task's gates folded into the gated norms. The output loads into a
stock mmdet / mmseg / mmpretrain config with

    backbone=dict(type='ResNet', depth=50, ...,  # ResNetV1c for deep_stem
                  init_cfg=dict(type='Pretrained', prefix='backbone.',
                                checkpoint='OUT.pth'))

Usage:
    python tools/model_converters/lego2resnet.py CKPT TASK OUT.pth \
        [--prefix backbone.]
"""
import os.path as osp
import sys

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from _lego_export import lego_extra_state, main, save_export  # noqa: E402

from projects.gppf.models import LegoResNet, lego  # noqa: E402


def convert(checkpoint: str,
            task: str,
            out: str,
            prefix: str = 'backbone.') -> dict:
    """Write ``task``'s sub-network of ``checkpoint`` to ``out``."""
    state = lego.read_state_dict(checkpoint, prefix)
    layout = lego_extra_state(state, checkpoint, prefix, 'LegoResNet',
                              task)['lego_layout']
    backbone = LegoResNet(**layout)
    backbone.load_state_dict(state, strict=True)
    dense = lego.extract_task_state_dict(backbone, task)
    stock = dict(
        depth=layout['depth'],
        deep_stem=layout['deep_stem'],
        avg_down=layout['avg_down'])
    return save_export(backbone, task, checkpoint, out, dense, stock)


def _summary(meta: dict) -> str:
    stock = meta['stock_backbone']
    return f', ResNet-{stock["depth"]} (deep_stem={stock["deep_stem"]})'


if __name__ == '__main__':
    main(__doc__, 'LegoResNet', convert, _summary)
