# cityscapes_seg: mmseg's stock UPerNet R50 on Cityscapes 512x1024 (2,975
# training images, 19 classes).
_base_ = ['mmseg::upernet/upernet_r50_4xb2-80k_cityscapes-512x1024.py']
