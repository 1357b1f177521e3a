# Mask R-CNN with a LegoViT-B backbone and ViTDet's simple feature pyramid on
# COCO 2017 instance segmentation, as mmdet's projects/ViTDet config.
#
# Reused as is: mmdet's stock Mask R-CNN R50-FPN model and its stock
# large-scale-jitter recipe `common/lsj-100e_coco-instance.py` (1024x1024
# LSJ crops, CocoDataset x4 repeats x 25 epochs = 100 epochs, LR steps at
# epochs 22 and 24 = 88 and 96, 32 GPUs x 2 images); the package has every
# piece of it, so LSJ is used, not the 1x pipeline. Changed: backbone
# (LegoViT-B/16, out_type='featmap', final_norm=False, drop path 0.1 as
# ViTDet), neck (SimpleFPN with LN2d), ViTDet's heads (2-conv RPN, 4conv1fc
# box head and mask head with LN2d), batch padding to 1024 and the test
# resize to 1024 (as ViTDet, so test inputs have the training grid), and the
# optimizer.
#
# Optimizer: plain AdamW (ViTDet's lr 1e-4, weight decay 0.1, fp16 AMP),
# without layer-wise lr decay: mmpretrain's
# LearningRateDecayOptimWrapperConstructor reads the depths from
# `model.get_layer_depth`, which mmdet detectors lack (NotImplementedError),
# and mmdet's / mmseg's layer-decay constructors accept ConvNeXt / BEiT / MAE
# backbones only. LegoViT keeps mmpretrain's parameter names, so the
# mmpretrain constructor works on LegoViT itself and on ImageClassifier.
#
# Differences from ViTDet: LegoViT attends globally in every layer (no window
# attention, no relative positions): at 1024x1024 that is 4096 tokens per
# layer; set `model.backbone.with_cp=True` if memory is short. Weights:
# random init here; start from a GPPF checkpoint or a dense ViT-B (inflated
# into the units) with
# backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=..., prefix=...)).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::common/lsj-100e_coco-instance.py',
]
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)

image_size = (1024, 1024)
norm_cfg = dict(type='LN2d', requires_grad=True)

model = dict(
    data_preprocessor=dict(
        pad_size_divisor=32,
        batch_augments=[
            dict(type='BatchFixedSizePad', size=image_size, pad_mask=True)
        ]),
    backbone=dict(
        _delete_=True,
        type='LegoViT',
        arch='base',
        num_legos=4,
        num_active=2,
        img_size=image_size[0],
        patch_size=16,
        out_indices=-1,
        out_type='featmap',
        final_norm=False,
        drop_path_rate=0.1,
        init_cfg=None),
    neck=dict(
        _delete_=True,
        type='SimpleFPN',
        backbone_channel=768,
        in_channels=[192, 384, 768, 768],
        out_channels=256,
        num_outs=5,
        norm_cfg=norm_cfg),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256,
            norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))

test_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='Pad', size=image_size, pad_val=dict(img=(114, 114, 114))),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(
        type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.1),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        custom_keys={
            'backbone.pos_embed': dict(decay_mult=0.0),
            'backbone.cls_token': dict(decay_mult=0.0),
            'backbone.router': dict(decay_mult=0.0)
        }))

# Stock DDP: the units off the route get no gradient in an iteration.
find_unused_parameters = True
