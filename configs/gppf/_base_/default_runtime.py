# Runtime shared by the GPPF configs.
#
# No library is the default scope: every task sub-tree (model, dataset and
# pipeline, metric) names its own library through `_scope_` (inherited from
# the stock task configs in ./tasks/) or a prefixed type, so that mmdet,
# mmseg and mmpretrain classes of the same name never shadow each other.
default_scope = 'mmengine'
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # mmengine's CheckpointHook, written atomically, refusing non-finite
    # weights, with every rank's random state for an exact resume.
    checkpoint=dict(
        type='SafeCheckpointHook',
        by_epoch=False,
        interval=5000,
        max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'))
# Router schedules, unit-utilisation logs and route heatmaps (LegoResNet).
custom_hooks = [
    dict(type='TaskRouterHook', noise_std=(1.0, 0.0), log_interval=50)
]

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # Collectives give up after `timeout` seconds instead of hanging when a
    # rank dies; tools/train.py falls back to gloo on machines without GPU.
    dist_cfg=dict(backend='nccl', timeout=1800))
# Distributed SIMT: gradients averaged over the ranks that produced them,
# tasks placed by train_cfg.placement ('all' or 'split').
model_wrapper_cfg = dict(type='SIMTDistributedWrapper')
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='Visualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
