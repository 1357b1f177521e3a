# mmseg's stock UPerNet R50 ADE20K with only the backbone swapped. ResNetV1c
# is ResNet with deep_stem=True, which LegoResNet takes as an argument.
_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)
model = dict(backbone=dict(type='LegoResNet', deep_stem=True))
# Stock DDP: the units off the route get no gradient in an iteration.
find_unused_parameters = True
