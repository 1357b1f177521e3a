"""Layers the ViT dense-prediction modules need (registered)."""
from .layer_norm_2d import LN2d

__all__ = ['LN2d']
