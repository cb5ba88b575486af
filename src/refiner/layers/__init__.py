"""Refined self-attention layers that drop into any transformer."""
from .attention import RefinedAttention
from .dla import REFINE_LAYOUTS, REFINE_MODES, DistributedLocalAttention
from .norm import BatchNorm2d

__all__ = ['BatchNorm2d', 'DistributedLocalAttention', 'REFINE_LAYOUTS', 'REFINE_MODES', 'RefinedAttention']
