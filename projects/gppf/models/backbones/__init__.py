"""Lego backbones: drop-in replacements of the stock dense backbones."""
from .lego_resnet import LegoResNet
from .lego_vit import LegoViT

__all__ = ['LegoResNet', 'LegoViT']
