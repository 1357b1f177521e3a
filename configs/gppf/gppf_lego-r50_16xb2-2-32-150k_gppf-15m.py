# GPPF-15M pre-training of GPPF-R50 (LegoResNet-50) with SIMT: 8 tasks from
# public datasets that mmdet, mmseg and mmpretrain read with their stock
# dataset classes (our choice; the paper's list is not public):
#   in21k_cls       ImageNet-21K (fall11)   14.20M images  classification
#   in1k_cls        ImageNet-1K              1.28M (in IN-21K) classification
#   coco_det        COCO 2017                0.118M  detection
#   o365_det        Objects365 v2            1.74M   detection
#   v3det_det       V3Det                    0.183M  detection
#   ade20k_seg      ADE20K                   0.020M  segmentation
#   cocostuff_seg   COCO-Stuff 164k          0.118M  (COCO images) segm.
#   cityscapes_seg  Cityscapes               0.003M  segmentation
# about 16.4M distinct images. 16 GPUs; per GPU and iteration 2 images of
# each detection and segmentation task and 32 of each classification task.
#
# Every task is its library's stock single-task config, read from
# ./_base_/tasks/ (see gppf_lego-r50_8xb2-2-32-90k_coco-ade20k-in1k.py for
# why they are read as values rather than listed in `_base_`).
from mmengine import Config as __Config

# runtime (../_base_/default_runtime.py) and schedule
_base_ = ['./_base_/schedules/schedule_simt_sgd_90k.py']

__dir = '{{ fileDirname }}/_base_/tasks/'
__files = dict(
    in21k_cls='in21k_cls_resnet',
    in1k_cls='in1k_cls_resnet',
    coco_det='coco_det_faster-rcnn',
    o365_det='o365_det_faster-rcnn',
    v3det_det='v3det_det_faster-rcnn',
    ade20k_seg='ade20k_seg_upernet',
    cocostuff_seg='cocostuff_seg_upernet',
    cityscapes_seg='cityscapes_seg_upernet')
__cfgs = {t: __Config.fromfile(__dir + f + '.py') for t, f in __files.items()}
__batch = dict(det=2, seg=2, cls=32)
__evaluated = [t for t in __files if t != 'in21k_cls']  # no IN-21K val set


def __model(cfg):
    """The stock task model; the shared backbone replaces its own."""
    extra = dict(backbone=None)
    if cfg.model._scope_ == 'mmseg':
        extra['pretrained'] = None
    if cfg.model._scope_ == 'mmpretrain':  # preprocessor kept at top level
        extra['data_preprocessor'] = dict(
            cfg.data_preprocessor, type='ClsDataPreprocessor')
    return dict(cfg.model, **extra)


def __train_loader(task, cfg):
    return dict(
        cfg.train_dataloader,
        batch_size=__batch[task.rsplit('_', 1)[1]],
        sampler=dict(type='InfiniteSampler', shuffle=True))


model = dict(
    type='GPPF',
    backbone=dict(
        type='LegoResNet',
        depth=50,
        num_legos=4,
        num_active=2,
        out_indices=(0, 1, 2, 3),
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        norm_eval=False,
        router=dict(temperature=1.0, noise_std=1.0, balance_weight=0.01)),
    tasks={
        t: __model(c)
        for t, c in __cfgs.items()
    },
    loss_weights={t: 1.0
                  for t in __files})

train_dataloader = {t: __train_loader(t, c) for t, c in __cfgs.items()}
val_dataloader = {t: __cfgs[t].val_dataloader for t in __evaluated}
val_evaluator = {t: __cfgs[t].val_evaluator for t in __evaluated}
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# The 90k schedule stretched to 150k iterations at twice the batch.
train_cfg = dict(max_iters=150000, val_interval=25000)
val_cfg = dict(tasks=__evaluated)
test_cfg = dict(tasks=__evaluated)
optim_wrapper = dict(optimizer=dict(lr=0.04))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
        end=2000),
    dict(
        type='CosineAnnealingLR',
        eta_min=0.0004,
        by_epoch=False,
        begin=2000,
        end=150000)
]
custom_hooks = [
    dict(
        type='TaskRouterHook',
        noise_std=(1.0, 0.0),
        warmup_iters=5000,
        freeze_iter=130000,
        log_interval=50)
]
