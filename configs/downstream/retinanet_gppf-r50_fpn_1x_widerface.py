# mmdet's stock RetinaNet R50-FPN on WIDER FACE;
# the backbone comes from a GPPF checkpoint.
_base_ = 'mmdet::wider_face/retinanet_r50_fpn_1x_widerface.py'
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)
# The new task's name and the pre-training task it starts from (route-copy
# way), and that task's sub-network exported by lego2resnet.py (export
# way); docs/downstream.md.
gppf_task = 'widerface_det'
gppf_source = 'coco_det'
gppf_export = 'checkpoints/gppf-r50_coco_det.pth'
model = dict(
    backbone=dict(
        init_cfg=dict(
            type='CheckedPretrained',
            prefix='backbone.',
            checkpoint=gppf_export)))
