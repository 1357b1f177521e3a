# Oxford Flowers-102: 102 flower species, 2,040 train+val / 6,149 test
# (mmpretrain's Flowers102, splits trainval/test), with mmpretrain's ImageNet
# pipeline and normalisation (imagenet_bs32.py) unchanged.
_base_ = 'mmpretrain::_base_/datasets/imagenet_bs32.py'
dataset_type = 'Flowers102'
data_root = 'data/Flowers102'
data_preprocessor = dict(num_classes=102)
train_dataloader = dict(
    batch_size=8,
    dataset=dict(type=dataset_type, data_root=data_root, split='trainval'))
val_dataloader = dict(
    batch_size=8,
    dataset=dict(type=dataset_type, data_root=data_root, split='test'))
test_dataloader = val_dataloader
# Top-1 and mean per-class accuracy (macro recall), the metric Kornblith et
# al. report for this dataset.
val_evaluator = [
    dict(type='Accuracy', topk=(1, )),
    dict(type='SingleLabelMetric', items=('recall', ), average='macro')
]
test_evaluator = val_evaluator
