# GPPF-ViT-B: SIMT pre-training of one LegoViT-B/16 on three tasks at once,
#   coco_det    COCO 2017 detection, Faster R-CNN with ViTDet's SimpleFPN
#               (mmdet; LN2d norms, 2-conv RPN, 4conv1fc box head)
#   ade20k_seg  ADE20K semantic segmentation, UPerNet on mmseg's
#               MultiLevelNeck (as mmseg's vit_vit-b16_mln_upernet config)
#   in1k_cls    ImageNet-1K classification, mmpretrain's ViT linear head
# 8 GPUs; per GPU and iteration 2 COCO + 2 ADE20K + 32 ImageNet images;
# 90k iterations. The GPPF-R50 config of the same mix
# (gppf_lego-r50_8xb2-2-32-90k_coco-ade20k-in1k.py) with the backbone, the
# necks and heads and the optimizer swapped; datasets, pipelines, metrics,
# loops and hooks are the same (the stock task configs of ./_base_/tasks/).
#
# Backbone outputs: GPPF gives every task the same backbone outputs, so the
# backbone returns the (B, 768, H/16, W/16) maps of layers 2, 5, 8 and 11
# (out_type='featmap', final_norm=False, as mmseg's and ViTDet's ViTs):
# - seg: MultiLevelNeck rescales the four maps (x4, x2, x1, x0.5);
# - det: SimpleFPN takes the last map (it accepts the backbone's tuple);
# - cls: the R50 mix's GlobalAveragePooling neck pools the last map and
#   VisionTransformerClsHead (one linear layer) classifies it. The featmap
#   outputs drop the cls token, so the head reads the pooled patch tokens
#   (as MAE's fine-tuning does), not the cls token; no adapter is needed.
# The position embedding is made for 224x224 (the cls input) and
# interpolated to each input's grid by LegoViT.
from mmengine import Config as __Config

# The R50 mix's data, loops, hooks and runtime; model and optimizer below.
_base_ = ['./gppf_lego-r50_8xb2-2-32-90k_coco-ade20k-in1k.py']

__dir = '{{ fileDirname }}/_base_/tasks/'
__det = __Config.fromfile(__dir + 'coco_det_faster-rcnn.py')
__seg = __Config.fromfile(__dir + 'ade20k_seg_upernet.py')
__cls = __Config.fromfile(__dir + 'in1k_cls_resnet.py')
__ln2d = dict(type='LN2d', requires_grad=True)
__channels = 768  # ViT-B

model = dict(
    _delete_=True,
    type='GPPF',
    # One shared backbone; with num_active=2 of num_legos=4 units, each
    # task's sub-network is exactly a ViT-B (see docs/lego_vit.md).
    backbone=dict(
        type='LegoViT',
        arch='base',
        num_legos=4,
        num_active=2,
        img_size=224,
        patch_size=16,
        out_indices=(2, 5, 8, 11),
        out_type='featmap',
        final_norm=False,
        drop_path_rate=0.1,
        router=dict(temperature=1.0, noise_std=1.0, balance_weight=0.01)),
    # The stock task models; `backbone=None`: the shared one is used. Their
    # data preprocessors move into the model's MultiTaskDataPreprocessor.
    tasks=dict(
        coco_det=dict(
            __det.model,
            backbone=None,
            neck=dict(
                type='SimpleFPN',
                backbone_channel=__channels,
                in_channels=[
                    __channels // 4, __channels // 2, __channels, __channels
                ],
                out_channels=256,
                num_outs=5,
                norm_cfg=__ln2d),
            rpn_head=dict(__det.model.rpn_head, num_convs=2),
            roi_head=dict(
                __det.model.roi_head,
                bbox_head=dict(
                    __det.model.roi_head.bbox_head,
                    type='Shared4Conv1FCBBoxHead',
                    conv_out_channels=256,
                    norm_cfg=__ln2d))),
        ade20k_seg=dict(
            __seg.model,
            backbone=None,
            pretrained=None,
            neck=dict(
                type='MultiLevelNeck',
                in_channels=[__channels] * 4,
                out_channels=__channels,
                scales=[4, 2, 1, 0.5]),
            decode_head=dict(
                __seg.model.decode_head, in_channels=[__channels] * 4),
            auxiliary_head=dict(
                __seg.model.auxiliary_head, in_channels=__channels,
                in_index=3)),
        in1k_cls=dict(
            __cls.model,
            backbone=None,
            head=dict(
                type='VisionTransformerClsHead',
                num_classes=1000,
                in_channels=__channels,
                loss=dict(
                    type='LabelSmoothLoss',
                    label_smooth_val=0.1,
                    mode='classy_vision'),
                topk=(1, 5)),
            data_preprocessor=dict(
                __cls.data_preprocessor, type='ClsDataPreprocessor'))),
    loss_weights=dict(coco_det=1.0, ade20k_seg=1.0, in1k_cls=1.0))

# AdamW (ViTDet's lr and betas) instead of the R50 mix's SGD; no weight decay
# on norms, biases, position embedding, cls token and router logits.
optim_wrapper = dict(
    _delete_=True,
    type='SIMTOptimWrapper',  # one backward per task, one iteration
    optimizer=dict(
        type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.1),
    clip_grad=dict(max_norm=1.0, norm_type=2),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        custom_keys={
            'backbone.pos_embed': dict(decay_mult=0.0),
            'backbone.cls_token': dict(decay_mult=0.0),
            'backbone.router': dict(decay_mult=0.0)
        }))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
        end=1000),
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-06,
        by_epoch=False,
        begin=1000,
        end=90000)
]
