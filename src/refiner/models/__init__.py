"""Model families registered with timm."""
from .refiner_vit import ConvStem, RefinerBlock, RefinerViT, checkpoint_filter_fn

__all__ = ['ConvStem', 'RefinerBlock', 'RefinerViT', 'checkpoint_filter_fn']
