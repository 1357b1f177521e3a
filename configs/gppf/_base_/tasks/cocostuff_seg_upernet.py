# cocostuff_seg: mmseg's stock UPerNet R50 head and COCO-Stuff 164k dataset
# (118k training images, 171 classes); mmseg ships no UPerNet config for it,
# so its model and dataset bases are combined as mmseg's own configs do.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/datasets/coco-stuff164k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    decode_head=dict(num_classes=171),
    auxiliary_head=dict(num_classes=171))
