# Transfer task of the GPPF experiment (tools/analysis_tools/
# gppf_experiment.py): mmdet's stock FCOS on the held-out trees_det data
# (real NEON aerial tree crowns, 400x400 tiles, one class; docs/data.md),
# shaped like the demo's mnist_det task: a stock ResNet-18 of base width 32,
# a 64-channel FPN on strides 8-32 and a 2-conv head. Tiles are resized to
# 192 px (tree boxes 7-35 px, about the digits' 24-64 px in mnist_det): from
# scratch, 240 iterations gave bbox mAP 0.015 at 192 px and 0.013 at 256 px,
# at 0.56x the cost.
# From scratch as is; from a pre-trained backbone with
#   --cfg-options model.backbone.init_cfg.type=Pretrained
#       model.backbone.init_cfg.prefix=backbone.
#       model.backbone.init_cfg.checkpoint=<GPPF checkpoint or lego2resnet
#       export>
_base_ = 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'
# weights-only loading of mmengine checkpoints (projects/gppf/utils)
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)

data_root = 'data/gppf_demo/trees_det/'
metainfo = dict(classes=('tree', ))
max_iters = 150
size = (192, 192)
widths = [32, 64, 128, 256]

model = dict(
    data_preprocessor=dict(
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True),
    backbone=dict(
        _delete_=True,
        type='ResNet',
        depth=18,
        base_channels=widths[0],
        out_indices=(0, 1, 2, 3),
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False),
    neck=dict(in_channels=widths, out_channels=64, num_outs=3),
    bbox_head=dict(
        num_classes=1,
        in_channels=64,
        stacked_convs=2,
        feat_channels=64,
        strides=[8, 16, 32],
        regress_ranges=((-1, 32), (32, 64), (64, 1e8)),
        norm_cfg=dict(type='GN', num_groups=16, requires_grad=True),
        loss_bbox=dict(type='GIoULoss')))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]


def _trees(split, pipeline):
    return dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file=f'annotations/{split}.json',
        data_prefix=dict(img=f'{split}/'),
        pipeline=pipeline)


train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler'),
    dataset=_trees('train', train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=_trees('val', test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator

# The demo's optimiser and schedule shape (5% linear warm-up, cosine).
train_cfg = dict(
    _delete_=True,
    type='IterBasedTrainLoop',
    max_iters=max_iters,
    val_interval=max_iters)
optim_wrapper = dict(
    _delete_=True,
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
