# Arm (b) of the GPPF experiment (tools/analysis_tools/gppf_experiment.py):
# the demo's SIMT pre-training with one stock dense mmdet ResNet-18 (base 32)
# shared by all tasks (hard sharing). Its width equals the active width of
# the demo's LegoResNet-18 (N=4, k=2: unit width = stage width / k), so every
# task costs the same. No router, so no TaskRouterHook.
_base_ = ['../gppf/gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py']

model = dict(
    backbone=dict(
        _delete_=True,
        _scope_='mmdet',
        type='ResNet',
        depth=18,
        base_channels=32,
        out_indices=(0, 1, 2, 3),
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False))
custom_hooks = []
