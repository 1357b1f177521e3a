# Mask R-CNN R50-FPN 1x on iSAID instances, composed of mmdet's stock bases:
# mmdet ships the iSAID dataset base but keeps its model config in mmdet's
# projects/iSAID (16 classes, 'background' included, as iSAIDDataset lists
# them). The backbone comes from a GPPF checkpoint.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/isaid_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py'
]
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)
# The new task's name and the pre-training task it starts from (route-copy
# way), and that task's sub-network exported by lego2resnet.py (export
# way); docs/downstream.md.
gppf_task = 'isaid_ins'
gppf_source = 'coco_det'
gppf_export = 'checkpoints/gppf-r50_coco_det.pth'
model = dict(
    backbone=dict(
        init_cfg=dict(
            type='CheckedPretrained',
            prefix='backbone.',
            checkpoint=gppf_export)),
    roi_head=dict(
        bbox_head=dict(num_classes=16), mask_head=dict(num_classes=16)))
