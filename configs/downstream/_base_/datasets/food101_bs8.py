# Food-101: 101 dishes, 75,750 train / 25,250 test images (mmpretrain's
# Food101, splits train/test), with mmpretrain's ImageNet pipeline and
# normalisation (imagenet_bs32.py) unchanged.
_base_ = 'mmpretrain::_base_/datasets/imagenet_bs32.py'
dataset_type = 'Food101'
data_root = 'data/food-101'
data_preprocessor = dict(num_classes=101)
train_dataloader = dict(
    batch_size=8,
    dataset=dict(type=dataset_type, data_root=data_root, split='train'))
val_dataloader = dict(
    batch_size=8,
    dataset=dict(type=dataset_type, data_root=data_root, split='test'))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
