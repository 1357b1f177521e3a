"""Stock mmdet / mmseg / mmpretrain configs with only the backbone swapped
for LegoResNet train one iteration through ``tools/train.py``.

Each test writes a config that inherits ``configs/lego_resnet/*.py`` and
changes only the data (tiny real demo data instead of COCO / ADE20K /
ImageNet), the number of classes and the schedule (1 iteration), then runs
``tools/train.py`` in a subprocess and checks the checkpoint and the logged
loss. The backbone is the config's own ``LegoResNet`` (ResNet-50 layout).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _simt_common import make_demo_data

pytestmark = [pytest.mark.slow, pytest.mark.data, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
          'Shirt', 'Sneaker', 'Bag', 'Ankle boot')


@pytest.fixture(scope='module')
def demo(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp('demo'), 8, num_val=4)


_NO_EVAL = """
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=1)
param_scheduler = []
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=1, by_epoch=False),
    logger=dict(type='LoggerHook', interval=1))
randomness = dict(seed=0)
"""


def _det_cfg(data: Path) -> str:
    return f"""
_base_ = ['{ROOT}/configs/lego_resnet/faster-rcnn_lego-r50_fpn_1x_coco.py']
model = dict(
    backbone=dict(init_cfg=None),
    roi_head=dict(bbox_head=dict(num_classes=10)))
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        data_root='{data}/mnist_det/',
        ann_file='annotations/train.json',
        data_prefix=dict(img='train/'),
        metainfo=dict(classes={tuple(str(i) for i in range(10))}),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True),
            dict(type='Resize', scale=(128, 128), keep_ratio=True),
            dict(type='PackDetInputs')
        ]))
""" + _NO_EVAL


def _seg_cfg(data: Path) -> str:
    return f"""
_base_ = [
    '{ROOT}/configs/lego_resnet/upernet_lego-r50_4xb4-160k_ade20k-512x512.py'
]
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(128, 128)),
    decode_head=dict(num_classes=11),
    auxiliary_head=dict(num_classes=11))
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        _delete_=True,
        type='BaseSegDataset',
        data_root='{data}/fmnist_seg/',
        data_prefix=dict(
            img_path='img_dir/train', seg_map_path='ann_dir/train'),
        img_suffix='.png', seg_map_suffix='.png',
        metainfo=dict(classes={('background', ) + FMNIST}),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations'),
            dict(type='RandomFlip', prob=0.5),
            dict(type='PackSegInputs')
        ]))
""" + _NO_EVAL


def _cls_cfg(data: Path) -> str:
    return f"""
_base_ = ['{ROOT}/configs/lego_resnet/resnet50-lego_8xb32_in1k.py']
model = dict(head=dict(num_classes=10))
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root='{data}/fmnist_cls/',
        ann_file='meta/train.txt',
        data_prefix='train',
        metainfo=dict(classes={FMNIST}),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=64),
            dict(type='PackInputs')
        ]))
""" + _NO_EVAL


@pytest.mark.parametrize('name,make,loss_key', [
    ('det', _det_cfg, 'loss_rpn_cls'),
    ('seg', _seg_cfg, 'decode.loss_ce'),
    ('cls', _cls_cfg, 'loss'),
])
def test_stock_config_trains_one_iteration(tmp_path, demo, name, make,
                                           loss_key):
    cfg = tmp_path / f'{name}.py'
    cfg.write_text(make(demo))
    work = tmp_path / 'work'
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'train.py'), str(cfg),
         '--work-dir', str(work)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = torch.load(work / 'iter_1.pth', map_location='cpu',
                      weights_only=False)
    state = ckpt['state_dict']
    # The backbone really is the lego one: units, router, ResNet-50 layout.
    assert 'backbone.router.logits' in state
    assert state['backbone.layer1.0.conv2.weight.5'].shape == (32, 32, 3, 3)
    logs = [json.loads(line) for line in next(
        work.glob('*/vis_data/scalars.json')).read_text().splitlines()]
    # The stock head's own loss terms were logged.
    assert math.isfinite(logs[-1][loss_key]) and logs[-1]['loss'] > 0
