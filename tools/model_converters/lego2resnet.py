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
import argparse
import os
import os.path as osp
import sys
import tempfile

import torch

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from projects.gppf.models import (LegoResNet,  # noqa: E402
                                  extract_task_state_dict, read_state_dict)


def convert(checkpoint: str,
            task: str,
            out: str,
            prefix: str = 'backbone.') -> dict:
    """Write ``task``'s sub-network of ``checkpoint`` to ``out``."""
    state = read_state_dict(checkpoint, prefix)
    from projects.gppf.models import unpack_state
    layout = unpack_state(state.get('_extra_state', {})).get('lego_layout')
    if layout is None:
        raise ValueError(f'{checkpoint} holds no LegoResNet under prefix '
                         f'{prefix!r} (no lego_layout found)')
    if task not in layout['tasks']:
        raise KeyError(f'task {task!r} is not routed by this checkpoint; its '
                       f'tasks are {layout["tasks"]}')
    backbone = LegoResNet(**layout)
    backbone.load_state_dict(state, strict=True)
    dense = extract_task_state_dict(backbone, task)
    route = backbone.router.greedy_route(task)
    meta = dict(
        gppf_task=task,
        gppf_source=osp.abspath(checkpoint),
        gppf_route=route.indices.tolist(),
        gppf_gates=route.gates.tolist(),
        stock_backbone=dict(
            depth=layout['depth'],
            deep_stem=layout['deep_stem'],
            avg_down=layout['avg_down']))
    out_state = {f'backbone.{k}': v for k, v in dense.items()}
    # Atomic: a crash never leaves a half-written checkpoint at OUT.
    out_dir = osp.dirname(osp.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix='.tmp')
    os.close(fd)
    try:
        torch.save(dict(state_dict=out_state, meta=meta), tmp)
        os.replace(tmp, out)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('checkpoint', help='GPPF or LegoResNet checkpoint')
    parser.add_argument('task', help='the task whose sub-network to extract')
    parser.add_argument('out', help='output checkpoint path')
    parser.add_argument(
        '--prefix',
        default='backbone.',
        help='prefix of the LegoResNet keys in CKPT')
    args = parser.parse_args()
    meta = convert(args.checkpoint, args.task, args.out, args.prefix)
    stock = meta['stock_backbone']
    print(f'wrote {args.out}: task {args.task}, ResNet-{stock["depth"]} '
          f'(deep_stem={stock["deep_stem"]})')


if __name__ == '__main__':
    main()
