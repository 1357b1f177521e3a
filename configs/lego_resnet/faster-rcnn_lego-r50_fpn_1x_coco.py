# mmdet's stock Faster R-CNN R50-FPN 1x COCO with only the backbone swapped.
# LegoResNet takes the stock ResNet arguments unchanged, and its init_cfg
# (torchvision://resnet50 here) is inflated into the lego units.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)
model = dict(backbone=dict(type='LegoResNet'))
# Stock DDP: the units off the route get no gradient in an iteration.
find_unused_parameters = True
