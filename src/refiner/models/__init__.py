"""Model families registered with timm: Refiner-ViT (its stem and block, the model, the authors' key layout)."""
from .blocks import ConvStem, RefinerBlock, check_image_input
from .official_keys import is_official_state_dict, official_to_refiner
from .refiner_vit import ARCHITECTURES, RELEASED, RefinerViT, checkpoint_filter_fn

__all__ = ['ARCHITECTURES', 'ConvStem', 'RELEASED', 'RefinerBlock', 'RefinerViT', 'check_image_input',
           'checkpoint_filter_fn', 'is_official_state_dict', 'official_to_refiner']
