"""refiner: refined self-attention (Zhou et al., arXiv 2106.03714) and the Refiner-ViT family for timm.

``import refiner`` registers ``refiner_vit_{s,m,l,ti,nano}`` and ``refined_vit`` with timm.
"""
from . import pretrained
from .convert import CheckpointError, convert_checkpoint, load_official
from .layers import DistributedLocalAttention, RefinedAttention
from .models import RefinerViT
from .retrofit import refine_vit

__version__ = '0.1.0'

__all__ = [
    'CheckpointError', 'DistributedLocalAttention', 'RefinedAttention', 'RefinerViT', 'convert_checkpoint',
    'load_official', 'pretrained', 'refine_vit', '__version__',
]
