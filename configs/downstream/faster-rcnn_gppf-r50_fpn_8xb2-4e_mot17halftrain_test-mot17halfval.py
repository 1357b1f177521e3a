# mmdet's stock Faster R-CNN R50-FPN pedestrian detector on MOT17;
# the backbone comes from a GPPF checkpoint.
# The stock config (SORT's detector) starts the whole detector from a
# COCO-trained Faster R-CNN; dropped, COCO being a pre-training dataset.
_base_ = [
    'mmdet::sort/faster-rcnn_r50_fpn_8xb2-4e_mot17halftrain_test-mot17halfval.py'  # noqa: E501
]
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)
# The new task's name and the pre-training task it starts from (route-copy
# way), and that task's sub-network exported by lego2resnet.py (export
# way); docs/downstream.md.
gppf_task = 'mot17_det'
gppf_source = 'coco_det'
gppf_export = 'checkpoints/gppf-r50_coco_det.pth'
model = dict(
    init_cfg=None,
    backbone=dict(
        init_cfg=dict(
            type='CheckedPretrained',
            prefix='backbone.',
            checkpoint=gppf_export)))
