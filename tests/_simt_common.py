"""Tiny three-task GPPF set-ups shared by the SIMT tests (CPU, seconds).

Tasks (real images from ``tools/dataset_converters/prepare_demo_data.py``,
written to a temporary folder with a few images each):
``mnist_det`` (mmdet FCOS), ``fmnist_seg`` (mmseg FCN head),
``fmnist_cls`` (mmpretrain linear head), on a ResNet-18 with 16 base
channels (stock ``mmdet.ResNet`` or ``LegoResNet``).
"""
import copy
import os
import os.path as osp
import sys
from pathlib import Path
from typing import Dict, Optional, Union

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TASKS = ('mnist_det', 'fmnist_seg', 'fmnist_cls')
MNIST = tuple(str(i) for i in range(10))
FMNIST = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
          'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
SIZE = 64
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
BASE = 16  # ResNet-18 stage widths 16, 32, 64, 128


def make_demo_data(root: Path,
                   num_train: Union[int, Dict[str, int]] = 8,
                   num_val: int = 4) -> Path:
    """Write the three demo datasets (few images) under ``root``.

    ``num_train`` is one count or a count per dataset name. If the
    environment names a prepared folder (``GPPF_TEST_DATA``, e.g. on a
    machine without the data sources), that folder is used instead.
    """
    prepared = os.environ.get('GPPF_TEST_DATA')
    if prepared:
        return Path(prepared).resolve()
    sys.path.insert(0, str(REPO / 'tools' / 'dataset_converters'))
    try:
        import prepare_demo_data
    finally:
        sys.path.pop(0)
    try:
        counts = [str(num_train)] if isinstance(num_train, int) else [
            f'{name}={n}' for name, n in num_train.items()
        ]
        prepare_demo_data.main([
            '--out', str(root), '--datasets', *TASKS, '--num-train', *counts,
            '--num-val',
            str(num_val)
        ])
    except SystemExit as e:  # a data source is not installed here
        pytest.skip(f'demo data sources unavailable: {e}')
    return root


def backbone_cfg(kind: str = 'resnet', base: int = BASE) -> dict:
    """The shared ResNet-18 (``'resnet'``: stock mmdet, ``'lego'``)."""
    common = dict(
        depth=18,
        base_channels=base,
        out_indices=(0, 1, 2, 3),
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False)
    if kind == 'lego':
        return dict(
            type='LegoResNet',
            num_legos=4,
            num_active=2,
            router=dict(noise_std=0.0),
            **common)
    return dict(type='mmdet.ResNet', **common)


def model_cfg(kind: str = 'resnet',
              loss_weights: Optional[Dict[str, float]] = None,
              base: int = BASE) -> dict:
    """GPPF with FCOS / FCN / linear heads on a shared tiny ResNet-18 whose
    stage widths are ``base * (1, 2, 4, 8)``."""
    det = dict(
        _scope_='mmdet',
        type='FCOS',
        neck=dict(
            type='FPN',
            in_channels=[base, base * 2, base * 4, base * 8],
            out_channels=32,
            start_level=1,
            add_extra_convs='on_output',
            num_outs=3,
            relu_before_extra_convs=True),
        bbox_head=dict(
            type='FCOSHead',
            num_classes=10,
            in_channels=32,
            stacked_convs=1,
            feat_channels=32,
            strides=[8, 16, 32],
            regress_ranges=((-1, 16), (16, 32), (32, 1e8)),
            norm_cfg=None,
            loss_cls=dict(
                type='FocalLoss',
                use_sigmoid=True,
                gamma=2.0,
                alpha=0.25,
                loss_weight=1.0),
            loss_bbox=dict(type='IoULoss', loss_weight=1.0),
            loss_centerness=dict(
                type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)),
        test_cfg=dict(
            nms_pre=100,
            min_bbox_size=0,
            score_thr=0.05,
            nms=dict(type='nms', iou_threshold=0.5),
            max_per_img=20))
    seg = dict(
        _scope_='mmseg',
        type='EncoderDecoder',
        decode_head=dict(
            type='FCNHead',
            in_channels=base * 2,
            in_index=1,
            channels=32,
            num_convs=1,
            concat_input=False,
            dropout_ratio=0.0,
            num_classes=11,
            norm_cfg=dict(type='BN', requires_grad=True),
            align_corners=False,
            loss_decode=dict(
                type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
        train_cfg=dict(),
        test_cfg=dict(mode='whole'))
    cls = dict(
        _scope_='mmpretrain',
        type='ImageClassifier',
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead',
            num_classes=10,
            in_channels=base * 8,
            loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))
    preprocessors = dict(
        mnist_det=dict(
            type='mmdet.DetDataPreprocessor',
            mean=MEAN,
            std=STD,
            bgr_to_rgb=True,
            pad_size_divisor=32),
        fmnist_seg=dict(
            type='mmseg.SegDataPreProcessor',
            mean=MEAN,
            std=STD,
            bgr_to_rgb=True,
            size=(SIZE, SIZE),
            pad_val=0,
            seg_pad_val=255),
        fmnist_cls=dict(
            type='mmpretrain.ClsDataPreprocessor',
            mean=MEAN,
            std=STD,
            to_rgb=True))
    return dict(
        type='GPPF',
        backbone=backbone_cfg(kind, base),
        tasks=dict(mnist_det=det, fmnist_seg=seg, fmnist_cls=cls),
        loss_weights=loss_weights,
        data_preprocessor=dict(
            type='MultiTaskDataPreprocessor', preprocessors=preprocessors))


def datasets(root: Path, split: str) -> Dict[str, dict]:
    """Dataset config per task for ``split`` ('train' or 'val')."""
    train = split == 'train'
    det_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='Resize', scale=(SIZE, SIZE), keep_ratio=True),
        dict(
            type='PackDetInputs',
            meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                       'scale_factor'))
    ]
    seg_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(SIZE, SIZE), keep_ratio=True),
        dict(type='LoadAnnotations'),
        dict(type='PackSegInputs')
    ]
    cls_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(32, 32)),
        dict(type='PackInputs')
    ]
    return dict(
        mnist_det=dict(
            _scope_='mmdet',
            type='CocoDataset',
            data_root=str(root / 'mnist_det'),
            ann_file=f'annotations/{split}.json',
            data_prefix=dict(img=f'{split}/'),
            metainfo=dict(classes=MNIST),
            filter_cfg=dict(filter_empty_gt=train),
            test_mode=not train,
            pipeline=det_pipeline),
        fmnist_seg=dict(
            _scope_='mmseg',
            type='BaseSegDataset',
            data_root=str(root / 'fmnist_seg'),
            data_prefix=dict(
                img_path=f'img_dir/{split}', seg_map_path=f'ann_dir/{split}'),
            img_suffix='.png',
            seg_map_suffix='.png',
            metainfo=dict(classes=('background', ) + FMNIST),
            pipeline=seg_pipeline),
        fmnist_cls=dict(
            _scope_='mmpretrain',
            type='CustomDataset',
            data_root=str(root / 'fmnist_cls'),
            ann_file=f'meta/{split}.txt',
            data_prefix=split,
            metainfo=dict(classes=FMNIST),
            pipeline=cls_pipeline))


def dataloaders(root: Path,
                split: str,
                batch_size: int = 2,
                shuffle: bool = True) -> Dict[str, dict]:
    """Dataloader config per task (InfiniteSampler for training)."""
    train = split == 'train'
    sampler = dict(type='InfiniteSampler' if train else 'DefaultSampler',
                   shuffle=shuffle and train)
    return {
        task: dict(
            batch_size=batch_size,
            num_workers=0,
            sampler=copy.deepcopy(sampler),
            dataset=dataset)
        for task, dataset in datasets(root, split).items()
    }


def evaluators(root: Path) -> Dict[str, dict]:
    """Stock metric per task."""
    return dict(
        mnist_det=dict(
            type='mmdet.CocoMetric',
            ann_file=osp.join(root, 'mnist_det', 'annotations', 'val.json'),
            metric='bbox'),
        fmnist_seg=dict(type='mmseg.IoUMetric', iou_metrics=['mIoU']),
        fmnist_cls=dict(type='mmpretrain.Accuracy', topk=(1, )))


def runner_cfg(root: Path,
               work_dir: Path,
               max_iters: int = 4,
               kind: str = 'resnet',
               val: bool = True,
               checkpoint_interval: int = 1000,
               batch_size: int = 2,
               **overrides) -> dict:
    """A complete Runner config of a tiny SIMT pre-training."""
    cfg = dict(
        default_scope='mmengine',
        model=model_cfg(kind),
        work_dir=str(work_dir),
        train_dataloader=dataloaders(root, 'train', batch_size),
        train_cfg=dict(
            type='SIMTTrainLoop', max_iters=max_iters, val_interval=10**6),
        optim_wrapper=dict(
            type='OptimWrapper',
            optimizer=dict(type='SGD', lr=0.01, momentum=0.9),
            clip_grad=dict(max_norm=10.0)),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.5, by_epoch=False, end=2)
        ],
        default_hooks=dict(
            timer=dict(type='IterTimerHook'),
            logger=dict(type='LoggerHook', interval=1),
            param_scheduler=dict(type='ParamSchedulerHook'),
            checkpoint=dict(
                type='SafeCheckpointHook',
                interval=checkpoint_interval,
                by_epoch=False)),
        randomness=dict(seed=0),
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        log_processor=dict(by_epoch=False),
        log_level='WARNING')
    if val:
        cfg.update(
            val_dataloader=dataloaders(root, 'val', batch_size),
            val_evaluator=evaluators(root),
            val_cfg=dict(type='SIMTValLoop'))
    cfg.update(overrides)
    return cfg
