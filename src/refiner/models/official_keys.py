"""The authors' key layout: recognise an original Refiner-ViT state dict and rename its keys to this project's.

Their refinement lives in ``attn.DLA`` and their blocks compute x + 2·f(LN(0.5·x)); here the factor 2
is folded into the converted weights (see :mod:`refiner.models.refiner_vit`'s docstring).
"""
from typing import Any, Dict, Mapping

import torch

__all__ = ['is_official_state_dict', 'official_to_refiner']

# original module names inside a refining block's attention -> ours
_OFFICIAL_RENAMES = (
    ('.attn.DLA.conv_exp.', '.attn.refine.expand.'),
    ('.attn.DLA.bn1.', '.attn.refine.expand_norm.'),
    ('.attn.DLA.depth_sep_conv.', '.attn.refine.local.'),
    ('.attn.DLA.bn2.', '.attn.refine.local_norm.'),
    ('.attn.DLA.conv_pro.', '.attn.refine.reduce.'),
    ('.attn.DLA.bn3.', '.attn.refine.reduce_norm.'),
    ('.attn.adapt_bn.', '.attn.refine_norm.'),
    ('.mlp.scale_channel', '.ls2.gamma'),
)


def is_official_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for the authors' key layout (their refinement lives in ``attn.DLA``)."""
    return any('.attn.DLA.' in k or k.endswith('.mlp.scale_channel') for k in state_dict)


def official_to_refiner(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the original's keys to this project's and fold its factor 2 on the residual branches."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        for old, new in _OFFICIAL_RENAMES:
            k = k.replace(old, new)
        if k.startswith('blocks.') and (k.endswith('.attn.proj.weight') or k.endswith('.attn.proj.bias')
                                        or k.endswith('.ls2.gamma')):
            v = v * 2  # x + 2·f(...) in the original
        out[k] = v
    return out

