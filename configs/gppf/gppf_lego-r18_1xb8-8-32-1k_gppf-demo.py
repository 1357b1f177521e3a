# GPPF demo: a short SIMT pre-training of one LegoResNet-18 on three small
# real datasets at once, on a CPU, then every task evaluated with its stock
# metric (data: tools/dataset_converters/prepare_demo_data.py):
#   mnist_det   MNIST digits placed on 128x128 canvases, COCO boxes;
#               mmdet FCOS head, CocoMetric (bbox mAP)
#   fmnist_seg  Fashion-MNIST items on 128x128 canvases, pixel masks;
#               mmseg FCN head, IoUMetric (mIoU)
#   fmnist_cls  Fashion-MNIST 28x28 images; mmpretrain linear head,
#               Accuracy (top-1)
# Every iteration trains all three tasks (8 + 8 + 32 images). Checkpoint,
# logs and route heatmaps land in work_dirs/<config name>/.
_base_ = ['./_base_/default_runtime.py']

data_root = 'data/gppf_demo/'
max_iters = 1000
mnist_classes = ('0', '1', '2', '3', '4', '5', '6', '7', '8', '9')
fmnist_classes = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                  'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
widths = [32, 64, 128, 256]  # LegoResNet-18 stage widths (base 32)

model = dict(
    type='GPPF',
    backbone=dict(
        type='LegoResNet',
        depth=18,
        base_channels=widths[0],
        num_legos=4,
        num_active=2,
        out_indices=(0, 1, 2, 3),
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        router=dict(temperature=1.0, noise_std=1.0, balance_weight=0.01)),
    tasks=dict(
        mnist_det=dict(
            _scope_='mmdet',
            type='FCOS',
            data_preprocessor=dict(
                type='DetDataPreprocessor',
                mean=mean,
                std=std,
                bgr_to_rgb=True,
                pad_size_divisor=32),
            neck=dict(
                type='FPN',
                in_channels=widths,
                out_channels=64,
                start_level=1,
                add_extra_convs='on_output',
                num_outs=3,
                relu_before_extra_convs=True),
            bbox_head=dict(
                type='FCOSHead',
                num_classes=10,
                in_channels=64,
                stacked_convs=2,
                feat_channels=64,
                strides=[8, 16, 32],
                regress_ranges=((-1, 32), (32, 64), (64, 1e8)),
                norm_cfg=dict(type='GN', num_groups=16, requires_grad=True),
                loss_cls=dict(
                    type='FocalLoss',
                    use_sigmoid=True,
                    gamma=2.0,
                    alpha=0.25,
                    loss_weight=1.0),
                loss_bbox=dict(type='GIoULoss', loss_weight=1.0),
                loss_centerness=dict(
                    type='CrossEntropyLoss',
                    use_sigmoid=True,
                    loss_weight=1.0)),
            test_cfg=dict(
                nms_pre=200,
                min_bbox_size=0,
                score_thr=0.05,
                nms=dict(type='nms', iou_threshold=0.5),
                max_per_img=20)),
        fmnist_seg=dict(
            _scope_='mmseg',
            type='EncoderDecoder',
            data_preprocessor=dict(
                type='SegDataPreProcessor',
                mean=mean,
                std=std,
                bgr_to_rgb=True,
                size=(128, 128),
                pad_val=0,
                seg_pad_val=255),
            decode_head=dict(
                type='FCNHead',
                in_channels=widths[1],
                in_index=1,
                channels=64,
                num_convs=2,
                concat_input=False,
                dropout_ratio=0.1,
                num_classes=11,
                norm_cfg=dict(type='BN', requires_grad=True),
                align_corners=False,
                # conv_seg keeps torch's default init (uniform, bound
                # 1/sqrt(64)) instead of mmseg's normal std 0.01, whose
                # small weights also scale down the gradient the head sends
                # the shared backbone: 1000 iterations from std 0.01 end at
                # 29 mIoU instead of 46 (docs/benchmarks.md, "The demo").
                init_cfg=None,
                loss_decode=dict(
                    type='CrossEntropyLoss',
                    use_sigmoid=False,
                    loss_weight=1.0)),
            train_cfg=dict(),
            test_cfg=dict(mode='whole')),
        fmnist_cls=dict(
            _scope_='mmpretrain',
            type='ImageClassifier',
            data_preprocessor=dict(
                type='ClsDataPreprocessor', mean=mean, std=std, to_rgb=True),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead',
                num_classes=10,
                in_channels=widths[3],
                loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))),
    loss_weights=dict(mnist_det=1.0, fmnist_seg=1.0, fmnist_cls=1.0))

det_train = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='PackDetInputs')
]
det_test = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
seg_train = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
seg_test = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
# Fashion-MNIST items at their native 28x28: the lego backbone keeps its
# norm statistics per task (task_norm='stats', the default with several
# tasks), so these statistics are not mixed with the 128x128 canvases'.
cls_train = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs')
]
cls_test = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]


def _det(split, pipeline):
    return dict(
        _scope_='mmdet',
        type='CocoDataset',
        data_root=data_root + 'mnist_det/',
        ann_file=f'annotations/{split}.json',
        data_prefix=dict(img=f'{split}/'),
        metainfo=dict(classes=mnist_classes),
        filter_cfg=dict(filter_empty_gt=split == 'train'),
        test_mode=split != 'train',
        pipeline=pipeline)


def _seg(split, pipeline):
    return dict(
        _scope_='mmseg',
        type='BaseSegDataset',
        data_root=data_root + 'fmnist_seg/',
        data_prefix=dict(
            img_path=f'img_dir/{split}', seg_map_path=f'ann_dir/{split}'),
        img_suffix='.png',
        seg_map_suffix='.png',
        metainfo=dict(classes=('background', ) + fmnist_classes),
        pipeline=pipeline)


def _cls(split, pipeline):
    return dict(
        _scope_='mmpretrain',
        type='CustomDataset',
        data_root=data_root + 'fmnist_cls/',
        ann_file=f'meta/{split}.txt',
        data_prefix=split,
        metainfo=dict(classes=fmnist_classes),
        pipeline=pipeline)


def _loader(dataset, batch_size, train):
    return dict(
        batch_size=batch_size,
        num_workers=0,
        sampler=dict(
            type='InfiniteSampler' if train else 'DefaultSampler',
            shuffle=train),
        dataset=dataset)


train_dataloader = dict(
    mnist_det=_loader(_det('train', det_train), 8, True),
    fmnist_seg=_loader(_seg('train', seg_train), 8, True),
    fmnist_cls=_loader(_cls('train', cls_train), 32, True))
val_dataloader = dict(
    mnist_det=_loader(_det('val', det_test), 8, False),
    fmnist_seg=_loader(_seg('val', seg_test), 8, False),
    fmnist_cls=_loader(_cls('val', cls_test), 64, False))
test_dataloader = val_dataloader
val_evaluator = dict(
    mnist_det=dict(
        type='mmdet.CocoMetric',
        ann_file=data_root + 'mnist_det/annotations/val.json',
        metric='bbox'),
    fmnist_seg=dict(type='mmseg.IoUMetric', iou_metrics=['mIoU']),
    fmnist_cls=dict(type='mmpretrain.Accuracy', topk=(1, )))
test_evaluator = val_evaluator

train_cfg = dict(
    type='SIMTTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='SIMTValLoop')
test_cfg = dict(type='SIMTTestLoop')

optim_wrapper = dict(
    type='SIMTOptimWrapper',  # one backward per task, one iteration
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10.0),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        custom_keys={'backbone.router': dict(decay_mult=0.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=50),
    dict(
        type='CosineAnnealingLR',
        eta_min=2e-5,
        by_epoch=False,
        begin=50,
        end=max_iters)
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=25),
    checkpoint=dict(
        type='SafeCheckpointHook', by_epoch=False, interval=max_iters))
custom_hooks = [
    dict(
        type='TaskRouterHook',
        noise_std=(1.0, 0.0),
        warmup_iters=50,
        freeze_iter=max_iters * 3 // 4,
        log_interval=25)
]
env_cfg = dict(dist_cfg=dict(backend='gloo'))
log_processor = dict(window_size=25)
