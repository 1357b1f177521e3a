# mmseg's stock UPerNet ViT-B/16 (MLN neck) ADE20K config with only the
# backbone swapped for LegoViT (k=2 of N=4 units per lego layer: the active
# width is ViT-B's, so a task's sub-network is a ViT-B). Every backbone
# argument of the stock config is mmseg's and LegoViT accepts it as is.
# Pretrained weights: the stock model-level
# ``pretrained='pretrain/vit_base_patch16_224.pth'`` (mmseg's vit2mmseg.py
# output; the base model's timm ``jx_vit_base_p16_224-80ecf9dd.pth`` loads
# too) works unchanged: EncoderDecoder hands it to the backbone, which turns
# it into ``init_cfg=dict(type='Pretrained', checkpoint=...)`` and inflates
# the dense ViT (mmseg or timm key names) into the lego units.
_base_ = 'mmseg::vit/vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.py'
custom_imports = dict(imports=['projects.gppf'], allow_failed_imports=False)
model = dict(backbone=dict(type='LegoViT'))
# Stock DDP: the units off the route get no gradient in an iteration.
find_unused_parameters = True
