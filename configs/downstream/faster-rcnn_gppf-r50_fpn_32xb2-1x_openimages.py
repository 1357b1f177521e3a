# mmdet's stock Faster R-CNN R50-FPN on Open Images v6;
# the backbone comes from a GPPF checkpoint.
_base_ = 'mmdet::openimages/faster-rcnn_r50_fpn_32xb2-1x_openimages.py'
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)
# The new task's name and the pre-training task it starts from (route-copy
# way), and that task's sub-network exported by lego2resnet.py (export
# way); docs/downstream.md.
gppf_task = 'openimages_det'
gppf_source = 'coco_det'
gppf_export = 'checkpoints/gppf-r50_coco_det.pth'
model = dict(
    backbone=dict(
        init_cfg=dict(
            type='CheckedPretrained',
            prefix='backbone.',
            checkpoint=gppf_export)))
