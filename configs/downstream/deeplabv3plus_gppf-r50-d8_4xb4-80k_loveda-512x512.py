# mmseg's stock DeepLabV3+ R50-D8 on LoveDA;
# the backbone comes from a GPPF checkpoint. GPPF-R50 has ResNet's 7x7
# stem, so the stock ResNetV1c (deep stem) becomes mmseg's ResNet, with
# the same strides and dilations.
_base_ = 'mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb4-80k_loveda-512x512.py'
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)
# The new task's name and the pre-training task it starts from (route-copy
# way), and that task's sub-network exported by lego2resnet.py (export
# way); docs/downstream.md.
gppf_task = 'loveda_seg'
gppf_source = 'ade20k_seg'
gppf_export = 'checkpoints/gppf-r50_ade20k_seg.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        type='ResNet',
        init_cfg=dict(
            type='CheckedPretrained',
            prefix='backbone.',
            checkpoint=gppf_export)))
