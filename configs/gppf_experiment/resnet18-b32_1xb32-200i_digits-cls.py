# Held-out classification task of the downstream transfer measurement
# (tools/analysis_tools/downstream_transfer.py, docs/downstream.md):
# mmpretrain's stock ImageClassifier on digits_cls (scikit-learn's UCI
# handwritten digits, 8x8, 16 grey levels; docs/data.md) in a few-shot
# setting: the first 100 training images (10 per class; the list is class
# round-robin), all 1,297 val images. Shaped like the demo's fmnist_cls task:
# a stock ResNet-18 of base width 32, global average pooling, a linear head.
# The 8x8 digits are resized to the 28 px of the demo's Fashion-MNIST items.
# From scratch as is; from a pre-trained backbone with
#   --cfg-options model.backbone.init_cfg.type=CheckedPretrained
#       model.backbone.init_cfg.prefix=backbone.
#       model.backbone.init_cfg.checkpoint=<lego2resnet export>
_base_ = 'mmpretrain::_base_/default_runtime.py'
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)

data_root = 'data/gppf_demo/digits_cls/'
classes = tuple(str(i) for i in range(10))
max_iters = 200
shots = 100  # training images
size = 28
widths = [32, 64, 128, 256]

model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(
        type='ClsDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        to_rgb=True),
    backbone=dict(
        type='ResNet',
        depth=18,
        # mmpretrain's ResNet keeps a 64-channel stem unless told; the demo's
        # LegoResNet-18 (and mmdet's ResNet) use the base width.
        stem_channels=widths[0],
        base_channels=widths[0],
        out_indices=(3, ),
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=10,
        in_channels=widths[3],
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))

pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(size, size), interpolation='bilinear'),
    dict(type='PackInputs')
]


def _digits(split, indices=None):
    return dict(
        indices=indices,
        type='CustomDataset',
        data_root=data_root,
        ann_file=f'meta/{split}.txt',
        data_prefix=split,
        metainfo=dict(classes=classes),
        pipeline=pipeline)


train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=_digits('train', shots))
val_dataloader = dict(
    batch_size=128,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=_digits('val'))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

# The demo's optimiser and schedule shape (5% linear warm-up, cosine).
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict()
test_cfg = dict()
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10.0),
    paramwise_cfg=dict(norm_decay_mult=0.0))
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=0.01,
        by_epoch=False,
        begin=0,
        end=max_iters // 20),
    dict(
        type='CosineAnnealingLR',
        eta_min=2e-5,
        by_epoch=False,
        begin=max_iters // 20,
        end=max_iters)
]
default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(window_size=25, by_epoch=False)
randomness = dict(seed=0)
