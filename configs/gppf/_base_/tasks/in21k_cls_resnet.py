# in21k_cls: mmpretrain's stock ResNet-50 on ImageNet-21K (fall11, 14.2M
# images, 21,843 classes; training split only, so it is not evaluated).
_base_ = ['mmpretrain::resnet/resnet50_8xb128_coslr-90e_in21k.py']
