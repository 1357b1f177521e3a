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
import argparse
import os
import os.path as osp
import sys
import tempfile

import torch

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from projects.gppf.models import LegoViT, lego  # noqa: E402


def convert(checkpoint: str,
            task: str,
            out: str,
            prefix: str = 'backbone.') -> dict:
    """Write ``task``'s sub-network of ``checkpoint`` to ``out``; returns
    the metadata saved with it (route, gates, stock backbone arguments)."""
    state = lego.read_vit_state_dict(checkpoint, prefix)
    extra = lego.unpack_state(state.get('_extra_state', {}))
    layout = extra.get('lego_layout')
    if layout is None or layout.get('backbone') != 'LegoViT':
        raise ValueError(f'{checkpoint} holds no LegoViT under prefix '
                         f'{prefix!r} (no LegoViT lego_layout found)')
    if task not in layout['tasks']:
        raise KeyError(f'task {task!r} is not routed by this checkpoint; its '
                       f'tasks are {layout["tasks"]}')
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
    route = backbone.router.greedy_route(task)
    meta = dict(
        gppf_task=task,
        gppf_source=osp.abspath(checkpoint),
        gppf_route=route.indices.tolist(),
        gppf_gates=route.gates.tolist(),
        stock_backbone=backbone.stock_args())
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
    parser.add_argument('checkpoint', help='GPPF or LegoViT checkpoint')
    parser.add_argument('task', help='the task whose sub-network to extract')
    parser.add_argument('out', help='output checkpoint path')
    parser.add_argument(
        '--prefix', default='backbone.', help='prefix of the LegoViT keys')
    args = parser.parse_args()
    meta = convert(args.checkpoint, args.task, args.out, args.prefix)
    print(f'wrote {args.out}: task {args.task}; stock backbone: '
          f"dict(type='VisionTransformer', **{meta['stock_backbone']})")


if __name__ == '__main__':
    main()
