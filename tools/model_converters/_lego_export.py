"""What ``lego2resnet.py`` and ``lego2vit.py`` share: the lego layout a
checkpoint holds, the export written atomically with the task's route, and
the command line."""
import argparse
import io
import os
import os.path as osp
from typing import Callable, Dict, Optional

import torch

from projects.gppf.engine.safe_checkpoint_hook import atomic_write
from projects.gppf.models import unpack_state

__all__ = ['lego_extra_state', 'save_export', 'main']


def lego_extra_state(state: Dict[str, torch.Tensor], checkpoint: str,
                     prefix: str, backbone: str, task: str) -> dict:
    """The extra state of the ``backbone`` (a class name) in ``state``;
    its ``lego_layout`` routes ``task``.

    Raises:
        ValueError: no ``backbone`` lego layout under ``prefix``.
        KeyError: the checkpoint does not route ``task``.
    """
    extra = unpack_state(state.get('_extra_state', {}))
    layout = extra.get('lego_layout')
    if layout is None or layout.get('backbone', 'LegoResNet') != backbone:
        raise ValueError(f'{checkpoint} holds no {backbone} under prefix '
                         f'{prefix!r} (no {backbone} lego_layout found)')
    if task not in layout['tasks']:
        raise KeyError(f'task {task!r} is not routed by this checkpoint; its '
                       f'tasks are {layout["tasks"]}')
    return extra


def save_export(backbone: torch.nn.Module,
                task: str,
                checkpoint: str,
                out: str,
                dense: Dict[str, torch.Tensor],
                stock_backbone: dict,
                key_prefix: str = 'backbone.',
                stock_format: Optional[str] = None) -> dict:
    """Write ``dense`` under ``key_prefix`` to ``out`` (atomically: a crash
    never leaves a half-written file there) with the task's route in its
    ``meta`` (and ``stock_format``, the library whose key names ``dense``
    has, if given); returns the meta."""
    route = backbone.router.greedy_route(task)
    meta = dict(
        gppf_task=task,
        gppf_source=osp.abspath(checkpoint),
        gppf_route=route.indices.tolist(),
        gppf_gates=route.gates.tolist(),
        stock_backbone=stock_backbone)
    if stock_format is not None:
        meta['stock_format'] = stock_format
    out_state = {f'{key_prefix}{k}': v for k, v in dense.items()}
    buffer = io.BytesIO()
    torch.save(dict(state_dict=out_state, meta=meta), buffer)
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    atomic_write(out, buffer.getvalue())
    return meta


def main(
    doc: str,
    backbone: str,
    convert: Callable[..., dict],
    summary: Callable[[dict], str],
    add_args: Optional[Callable[[argparse.ArgumentParser],
                                None]] = None) -> None:
    """``CKPT TASK OUT [--prefix P]``: run ``convert`` and print
    ``wrote OUT: task TASK`` and ``summary(meta)``. ``add_args`` adds
    tool-specific options, passed to ``convert`` as keyword arguments."""
    parser = argparse.ArgumentParser(description=doc.split('\n')[0])
    parser.add_argument('checkpoint', help=f'GPPF or {backbone} checkpoint')
    parser.add_argument('task', help='the task whose sub-network to extract')
    parser.add_argument('out', help='output checkpoint path')
    parser.add_argument(
        '--prefix',
        default='backbone.',
        help=f'prefix of the {backbone} keys in CKPT')
    if add_args is not None:
        add_args(parser)
    args = vars(parser.parse_args())
    checkpoint, task, out = (
        args.pop(k) for k in ('checkpoint', 'task', 'out'))
    meta = convert(checkpoint, task, out, **args)
    print(f'wrote {out}: task {task}{summary(meta)}')
