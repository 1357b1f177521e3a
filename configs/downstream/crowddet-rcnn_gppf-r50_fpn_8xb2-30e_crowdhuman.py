# mmdet's stock CrowdDet R50-FPN on CrowdHuman;
# the backbone comes from a GPPF checkpoint.
_base_ = 'mmdet::crowddet/crowddet-rcnn_r50_fpn_8xb2-30e_crowdhuman.py'
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)
# The new task's name and the pre-training task it starts from (route-copy
# way), and that task's sub-network exported by lego2resnet.py (export
# way); docs/downstream.md.
gppf_task = 'crowdhuman_det'
gppf_source = 'coco_det'
gppf_export = 'checkpoints/gppf-r50_coco_det.pth'
model = dict(
    backbone=dict(
        init_cfg=dict(
            type='CheckedPretrained',
            prefix='backbone.',
            checkpoint=gppf_export)))
