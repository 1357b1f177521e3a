# v3det_det: mmdet's stock Faster R-CNN R50-FPN on V3Det (183k training
# images, 13,204 classes, normed-linear classifier).
_base_ = [
    'mmdet::v3det/faster_rcnn_r50_fpn_8x4_sample1e-3_mstrain_v3det_2x.py'
]
