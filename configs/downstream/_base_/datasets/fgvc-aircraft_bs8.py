# FGVC Aircraft: 100 aircraft variants, 6,667 trainval / 3,333 test
# (mmpretrain's FGVCAircraft, splits trainval/test), with mmpretrain's ImageNet
# pipeline and normalisation (imagenet_bs32.py) unchanged.
_base_ = 'mmpretrain::_base_/datasets/imagenet_bs32.py'
dataset_type = 'FGVCAircraft'
data_root = 'data/fgvc-aircraft-2013b'
data_preprocessor = dict(num_classes=100)
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
