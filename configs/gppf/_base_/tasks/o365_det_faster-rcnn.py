# o365_det: mmdet's stock Faster R-CNN R50-FPN on Objects365 v2 (1.74M
# training images, 365 classes).
_base_ = ['mmdet::objects365/faster-rcnn_r50_fpn_16xb4-1x_objects365v2.py']
