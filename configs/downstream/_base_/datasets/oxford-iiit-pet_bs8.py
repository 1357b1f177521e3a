# Oxford-IIIT Pets: 37 cat and dog breeds, 3,680 trainval / 3,669 test
# (mmpretrain's OxfordIIITPet, splits trainval/test), with mmpretrain's
# ImageNet pipeline and normalisation (imagenet_bs32.py) unchanged.
_base_ = 'mmpretrain::_base_/datasets/imagenet_bs32.py'
dataset_type = 'OxfordIIITPet'
data_root = 'data/Oxford-IIIT_Pets'
data_preprocessor = dict(num_classes=37)
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
