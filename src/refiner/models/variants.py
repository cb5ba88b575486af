"""The Refiner-ViT variants as data: each one's shape (one table) and its timm pretrained configs.

:mod:`.refiner_vit` registers a timm model per row of :data:`ARCHITECTURES`; :mod:`refiner.convert`
reads the same table to name the variant of an original checkpoint from its inferred shape.
"""
from typing import Any, Dict

from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import generate_default_cfgs

__all__ = ['ARCHITECTURES', 'RELEASED', 'default_cfgs']

ARCHITECTURES: Dict[str, Dict[str, Any]] = {  # registered name -> its shape (model arguments)
    'refiner_vit_s': dict(embed_dim=384, depth=16, num_heads=12, mlp_ratio=3.),
    'refiner_vit_m': dict(embed_dim=420, depth=32, num_heads=12, mlp_ratio=3.),
    'refiner_vit_l': dict(embed_dim=512, depth=32, num_heads=16, mlp_ratio=3.),
    'refiner_vit_ti': dict(embed_dim=192, depth=12, num_heads=6, mlp_ratio=3.),
    'refiner_vit_nano': dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=3.),
}
RELEASED = ('refiner_vit_s', 'refiner_vit_m', 'refiner_vit_l')  # the authors' checkpoints come in these shapes


def _cfg(input_size: int = 224, crop_pct: float = 0.9, **kwargs) -> Dict[str, Any]:
    return {
        'url': '',  # the authors' checkpoints are not fetched; see refiner.load_official / `refiner convert`
        'num_classes': 1000,
        'input_size': (3, input_size, input_size),
        'pool_size': None,
        'crop_pct': crop_pct,
        'interpolation': 'bicubic',
        'fixed_input_size': False,
        'mean': IMAGENET_INCEPTION_MEAN,
        'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'patch_embed.conv1',
        'classifier': 'head',
        'paper_ids': 'arXiv:2106.03714',
        'paper_name': 'Refiner: Refining Self-attention for Vision Transformers',
        'origin_url': 'https://github.com/zhoudaquan/Refiner_ViT',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # published ImageNet-1k top-1: S 83.6 / 84.6 (384); M 84.6 / 85.6; L 84.9 / 85.8 / 86.0 (448)
    'refiner_vit_s.in1k': _cfg(224, crop_pct=0.9),
    'refiner_vit_s.in1k_384': _cfg(384, crop_pct=1.0),
    'refiner_vit_m.in1k': _cfg(224, crop_pct=1.0),
    'refiner_vit_m.in1k_384': _cfg(384, crop_pct=1.0),
    'refiner_vit_l.in1k': _cfg(224, crop_pct=1.13),
    'refiner_vit_l.in1k_384': _cfg(384, crop_pct=1.0),
    'refiner_vit_l.in1k_448': _cfg(448, crop_pct=1.0),
    # small variants, trained from scratch (no published weights)
    'refiner_vit_ti': _cfg(224, crop_pct=0.9),
    'refiner_vit_nano': _cfg(32, crop_pct=1.0),
})
