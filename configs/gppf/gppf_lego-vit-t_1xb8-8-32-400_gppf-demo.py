# GPPF demo with a LegoViT: the LegoResNet-18 demo's three tasks, data,
# pipelines, evaluators, optimiser and hooks (inherited from it), with one
# shared ViT-Tiny-size LegoViT instead of the ResNet, on a 2-core CPU:
#   mnist_det   ViTDet's SimpleFPN on the last map (strides 4 to 32) and
#               the FCOS head
#   fmnist_seg  FCN head on the maps of layers 3, 7 and 11, concatenated
#               (stride 16)
#   fmnist_cls  the linear head on the average of the last map
# Every iteration trains all three tasks (8 + 8 + 32 images); 400
# iterations. Checkpoint, logs and route heatmaps land in
# work_dirs/<config name>/.
_base_ = ['./gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py']

max_iters = 400
warmup_iters = 40
embed_dims = 192  # ViT-Tiny (DeiT-Tiny): 12 layers, 3 heads of 64, MLP 768

model = dict(
    backbone=dict(
        _delete_=True,
        type='LegoViT',
        arch='deit-tiny',
        # ViT-Tiny's 3 heads do not divide by k=2: k=3 of N=6 units per lego
        # layer keeps a task's sub-network exactly a stock ViT-Tiny (a unit
        # is 1 head and 256 MLP channels), with twice its width to route.
        num_legos=6,
        num_active=3,
        img_size=128,
        # Patch 16: 8x8 tokens on the 128 px canvases, 2x2 on the 28 px
        # items (padded to 32). Patch 8 (16x16 tokens) costs about 3x as
        # much per iteration (the ViT and the stride-2 pyramid level), too
        # few iterations in 15 min on 2 cores for a ViT from scratch.
        patch_size=16,
        out_indices=(3, 7, 11),
        out_type='featmap',  # (B, 192, H / 16, W / 16) per output
        final_norm=True,  # LayerNorm on the last output only
        router=dict(temperature=1.0, noise_std=1.0, balance_weight=0.01)),
    tasks=dict(
        mnist_det=dict(
            neck=dict(
                _delete_=True,
                type='SimpleFPN',  # the last map x4, x2, x1, x1/2
                backbone_channel=embed_dims,
                in_channels=[
                    embed_dims // 4, embed_dims // 2, embed_dims, embed_dims
                ],
                out_channels=64,
                num_outs=4,
                norm_cfg=dict(type='LN2d', requires_grad=True)),
            bbox_head=dict(
                strides=[4, 8, 16, 32],
                regress_ranges=((-1, 16), (16, 32), (32, 64), (64, 1e8)))),
        fmnist_seg=dict(
            decode_head=dict(
                in_channels=[embed_dims] * 3,
                in_index=(0, 1, 2),
                input_transform='resize_concat')),
        fmnist_cls=dict(head=dict(in_channels=embed_dims))))

# What depends on max_iters is set again (lists are replaced whole).
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    paramwise_cfg=dict(
        bias_decay_mult=0.0,
        custom_keys={
            'backbone.pos_embed': dict(decay_mult=0.0),
            'backbone.cls_token': dict(decay_mult=0.0)
        }))
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=0.01,
        by_epoch=False,
        begin=0,
        end=warmup_iters),
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-5,
        by_epoch=False,
        begin=warmup_iters,
        end=max_iters)
]
default_hooks = dict(
    logger=dict(interval=10), checkpoint=dict(interval=max_iters))
custom_hooks = [
    dict(
        type='TaskRouterHook',
        noise_std=(1.0, 0.0),
        warmup_iters=warmup_iters,
        freeze_iter=max_iters * 3 // 4,
        log_interval=10)
]
log_processor = dict(window_size=10)
