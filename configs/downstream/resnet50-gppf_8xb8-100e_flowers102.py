# mmpretrain's ResNet-50 classifier (models/resnet50.py) and fine-tuning
# schedule (schedules/cub_bs64.py: SGD, lr 0.01 for 64 images, cosine, 100
# epochs) on Flowers-102; the backbone comes from a GPPF checkpoint.
_base_ = [
    'mmpretrain::_base_/models/resnet50.py',
    './_base_/datasets/flowers102_bs8.py',
    'mmpretrain::_base_/schedules/cub_bs64.py',
    'mmpretrain::_base_/default_runtime.py'
]
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)
# The new task's name and the pre-training task it starts from (route-copy
# way), and that task's sub-network exported by lego2resnet.py (export
# way); docs/downstream.md.
gppf_task = 'flowers102_cls'
gppf_source = 'in1k_cls'
gppf_export = 'checkpoints/gppf-r50_in1k_cls.pth'
model = dict(
    backbone=dict(
        init_cfg=dict(
            type='CheckedPretrained',
            prefix='backbone.',
            checkpoint=gppf_export)),
    head=dict(num_classes=102))
