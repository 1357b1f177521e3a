# GPPF-R50: SIMT pre-training of one LegoResNet-50 on three tasks at once,
#   coco_det    COCO 2017 detection, Faster R-CNN R50-FPN head (mmdet)
#   ade20k_seg  ADE20K semantic segmentation, UPerNet head (mmseg)
#   in1k_cls    ImageNet-1K classification, linear head (mmpretrain)
# 8 GPUs; per GPU and iteration 2 COCO + 2 ADE20K + 32 ImageNet images;
# 90k iterations.
#
# How the libraries' configs are reused: each task is its library's stock
# single-task config (./_base_/tasks/*.py inherit `mmdet::...`, `mmseg::...`,
# `mmpretrain::...`), so its model, dataset, pipelines and metric are the
# stock ones and carry `_scope_`. They cannot all be `_base_` files of this
# config: mmengine refuses duplicate keys among bases and every library's
# config defines `model`, `train_dataloader`, `val_evaluator`, ... Instead
# they are read as values with Config.fromfile and placed under their task
# name (`__`-prefixed names stay out of the final config).
from mmengine import Config as __Config

# runtime (../_base_/default_runtime.py) and schedule
_base_ = ['./_base_/schedules/schedule_simt_sgd_90k.py']

__dir = '{{ fileDirname }}/_base_/tasks/'
__det = __Config.fromfile(__dir + 'coco_det_faster-rcnn.py')
__seg = __Config.fromfile(__dir + 'ade20k_seg_upernet.py')
__cls = __Config.fromfile(__dir + 'in1k_cls_resnet.py')
__infinite = dict(type='InfiniteSampler', shuffle=True)

model = dict(
    type='GPPF',
    # One shared backbone; with num_active=2 of num_legos=4 units, each
    # task's sub-network is exactly a ResNet-50 (see docs/lego_resnet.md).
    backbone=dict(
        type='LegoResNet',
        depth=50,
        num_legos=4,
        num_active=2,
        out_indices=(0, 1, 2, 3),
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        norm_eval=False,
        router=dict(temperature=1.0, noise_std=1.0, balance_weight=0.01)),
    # The stock task models; `backbone=None`: the shared one is used. Their
    # data preprocessors move into the model's MultiTaskDataPreprocessor.
    tasks=dict(
        coco_det=dict(__det.model, backbone=None),
        ade20k_seg=dict(__seg.model, backbone=None, pretrained=None),
        in1k_cls=dict(
            __cls.model,
            backbone=None,
            data_preprocessor=dict(
                __cls.data_preprocessor, type='ClsDataPreprocessor'))),
    loss_weights=dict(coco_det=1.0, ade20k_seg=1.0, in1k_cls=1.0))

train_dataloader = dict(
    coco_det=dict(__det.train_dataloader, batch_size=2, sampler=__infinite),
    ade20k_seg=dict(__seg.train_dataloader, batch_size=2),
    in1k_cls=dict(__cls.train_dataloader, batch_size=32, sampler=__infinite))
val_dataloader = dict(
    coco_det=__det.val_dataloader,
    ade20k_seg=__seg.val_dataloader,
    in1k_cls=__cls.val_dataloader)
test_dataloader = val_dataloader
val_evaluator = dict(
    coco_det=__det.val_evaluator,
    ade20k_seg=__seg.val_evaluator,
    in1k_cls=__cls.val_evaluator)
test_evaluator = val_evaluator
