"""Lego backbones: drop-in replacements of the stock dense backbones."""
from .lego_resnet import LegoResNet

__all__ = ['LegoResNet']
