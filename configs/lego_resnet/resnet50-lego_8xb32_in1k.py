# mmpretrain's stock ResNet-50 ImageNet-1K classifier with only the backbone
# swapped for LegoResNet (k=2 of N=4 units: the active width is ResNet-50's).
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)
model = dict(backbone=dict(type='LegoResNet'))
# Stock DDP: the units off the route get no gradient in an iteration.
find_unused_parameters = True
