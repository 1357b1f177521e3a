"""Necks for LegoViT dense prediction (registered in mmdet's MODELS)."""
from .simple_fpn import SimpleFPN

__all__ = ['SimpleFPN']
