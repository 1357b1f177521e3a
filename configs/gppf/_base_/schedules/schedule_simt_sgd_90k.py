# SIMT pre-training schedule of the GPPF-R50 configs: SGD with a linear
# warm-up and cosine decay over 90k iterations; the router's schedules
# (TaskRouterHook) follow the same iterations. Configs of another length
# override max_iters, the two schedulers' bounds and the hook's iterations.
# It sets hooks that the runtime defines, so it inherits the runtime.
_base_ = ['../default_runtime.py']

train_cfg = dict(type='SIMTTrainLoop', max_iters=90000, val_interval=10000)
val_cfg = dict(type='SIMTValLoop')
test_cfg = dict(type='SIMTTestLoop')

optim_wrapper = dict(
    type='SIMTOptimWrapper',  # one backward per task, one iteration
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001),
    clip_grad=dict(max_norm=35, norm_type=2),
    paramwise_cfg=dict(custom_keys={'backbone.router': dict(decay_mult=0.0)}))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
        end=1000),
    dict(
        type='CosineAnnealingLR',
        eta_min=0.0002,
        by_epoch=False,
        begin=1000,
        end=90000)
]
default_hooks = dict(
    checkpoint=dict(type='SafeCheckpointHook', by_epoch=False, interval=10000))
custom_hooks = [
    dict(
        type='TaskRouterHook',
        noise_std=(1.0, 0.0),
        warmup_iters=2000,
        freeze_iter=80000,
        log_interval=50)
]
