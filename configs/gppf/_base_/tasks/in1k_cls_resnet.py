# in1k_cls: mmpretrain's stock ResNet-50 on ImageNet-1K (its classifier,
# dataset, pipelines and Accuracy; `_scope_='mmpretrain'` comes with the
# base). mmpretrain keeps the data preprocessor at the top level.
_base_ = ['mmpretrain::resnet/resnet50_8xb32_in1k.py']
