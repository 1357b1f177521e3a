# Stanford Cars: 196 car models, 8,144 train / 8,041 test (mmpretrain's
# StanfordCars, splits train/test), with mmpretrain's ImageNet pipeline and
# normalisation (imagenet_bs32.py) unchanged.
_base_ = 'mmpretrain::_base_/datasets/imagenet_bs32.py'
dataset_type = 'StanfordCars'
data_root = 'data/Stanford_Cars'
data_preprocessor = dict(num_classes=196)
train_dataloader = dict(
    batch_size=8,
    dataset=dict(type=dataset_type, data_root=data_root, split='train'))
val_dataloader = dict(
    batch_size=8,
    dataset=dict(type=dataset_type, data_root=data_root, split='test'))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
