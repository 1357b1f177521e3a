# ade20k_seg: mmseg's stock UPerNet R50 on ADE20K 512x512 (its model,
# dataset, pipelines and IoUMetric; `_scope_='mmseg'` comes with the base).
_base_ = ['mmseg::upernet/upernet_r50_4xb4-80k_ade20k-512x512.py']
