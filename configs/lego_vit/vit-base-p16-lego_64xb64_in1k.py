# mmpretrain's stock ViT-B/16 ImageNet-1K classifier with only the backbone
# swapped for LegoViT (k=2 of N=4 units per lego layer: the active width is
# ViT-B's, so a task's sub-network is a ViT-B).
_base_ = 'mmpretrain::vision_transformer/vit-base-p16_64xb64_in1k.py'
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)
model = dict(backbone=dict(type='LegoViT'))
# Stock DDP: the units off the route get no gradient in an iteration.
find_unused_parameters = True
