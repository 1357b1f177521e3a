# CIFAR-10 as mmpretrain ships it (cifar10_bs16.py: dataset, splits,
# normalisation, crop and flip), the 32 px images resized to 224 px for an
# ImageNet-stem ResNet-50: the transfer protocol of Kornblith et al. (2019).
_base_ = 'mmpretrain::_base_/datasets/cifar10_bs16.py'
train_pipeline = [
    dict(type='RandomCrop', crop_size=32, padding=4),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='Resize', scale=224),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='Resize', scale=224),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=8, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=8, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
