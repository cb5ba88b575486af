"""Over-smoothing analysis of vision transformers (Refiner, Zhou et al. 2021, arXiv 2106.03714).

- :mod:`.cka`: linear CKA and the minibatch CKA estimator (Nguyen, Raghu & Kornblith 2021);
- :mod:`.features`: per-block features of Refiner-ViT, timm ViT/DeiT and ResNet models;
- :mod:`.attention_maps`: attention maps per block, the stages of their refinement, and their
  diversity across heads and blocks;
- :mod:`.plots`: the figures;
- :mod:`.inputs`: the models (loaded through :mod:`refiner.pretrained`), the held-out images, JSON out;
- :mod:`.compute`: the analyses as functions of plain arguments (``block_cka``, ``attention_diversity``,
  ``show_attention``);
- :mod:`.summary`: several of those analyses (one per seed) combined, mean ± std per model;
- :mod:`.commands`: ``refiner analyze {cka,attention,summary}`` and ``refiner show-attention`` (arguments,
  printing).
"""
from .attention_maps import (
    AttentionDiversity,
    NoAttentionError,
    attention_blocks,
    attention_maps,
    cross_block_similarity,
    head_similarity,
    refine_stages,
)
from .cka import DEPTHS, MinibatchCKA, curve_at, hsic_unbiased, linear_cka, normalised_curve
from .features import AnalysisError, NoIntermediatesError, block_features, iterate_features
from .plots import (
    plot_attention_diversity,
    plot_attention_grid,
    plot_cka_curves,
    plot_cka_heatmap,
    plot_cka_run_curves,
)

__all__ = [
    'DEPTHS', 'AnalysisError', 'AttentionDiversity', 'MinibatchCKA', 'NoAttentionError', 'NoIntermediatesError',
    'attention_blocks', 'attention_maps', 'block_features', 'cross_block_similarity', 'curve_at', 'head_similarity',
    'hsic_unbiased', 'iterate_features', 'linear_cka', 'normalised_curve', 'plot_attention_diversity',
    'plot_attention_grid', 'plot_cka_curves', 'plot_cka_heatmap', 'plot_cka_run_curves', 'refine_stages',
]
