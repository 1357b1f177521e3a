# coco_det: mmdet's stock Faster R-CNN R50-FPN 1x on COCO 2017 (its model,
# dataset, pipelines and CocoMetric; `_scope_='mmdet'` comes with the base).
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py']
