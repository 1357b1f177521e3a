# DTD: 47 texture classes, 3,760 trainval / 1,880 test images (mmpretrain's
# DTD, splits trainval/test), with mmpretrain's ImageNet pipeline and
# normalisation (imagenet_bs32.py) unchanged.
_base_ = 'mmpretrain::_base_/datasets/imagenet_bs32.py'
dataset_type = 'DTD'
data_root = 'data/dtd'
data_preprocessor = dict(num_classes=47)
train_dataloader = dict(
    batch_size=8,
    dataset=dict(type=dataset_type, data_root=data_root, split='trainval'))
val_dataloader = dict(
    batch_size=8,
    dataset=dict(type=dataset_type, data_root=data_root, split='test'))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
