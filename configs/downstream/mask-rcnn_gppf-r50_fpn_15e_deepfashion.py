# mmdet's stock Mask R-CNN R50-FPN on DeepFashion In-shop;
# the backbone comes from a GPPF checkpoint.
_base_ = 'mmdet::deepfashion/mask-rcnn_r50_fpn_15e_deepfashion.py'
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)
# The new task's name and the pre-training task it starts from (route-copy
# way), and that task's sub-network exported by lego2resnet.py (export
# way); docs/downstream.md.
gppf_task = 'deepfashion_ins'
gppf_source = 'coco_det'
gppf_export = 'checkpoints/gppf-r50_coco_det.pth'
model = dict(
    backbone=dict(
        init_cfg=dict(
            type='CheckedPretrained',
            prefix='backbone.',
            checkpoint=gppf_export)))
