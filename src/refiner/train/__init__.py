"""``refiner train``: the paper's (DeiT-style) recipe on timm's pipeline, one process or many (torchrun).

Reproducibility and exact resume: every random draw is a function of counters, not of hidden
state. The sampler's order is drawn from (seed, epoch); each sample's augmentation from (seed,
epoch, index), whichever worker loads it; Mixup, MixToken, stochastic depth and dropout in the
main process from (seed, step, rank), re-seeded before every step. One job per module, each
importing only those above it:

- :mod:`.distributed`: the process group, each rank's share, seeding from counters;
- :mod:`.objective`: what a step calls and the loss terms;
- :mod:`.setup`: the model from its source, the data, the optimizer and schedule, precision;
- :mod:`.trainer`: the loop: steps, checkpoints, evaluation, the final files;
- :mod:`.run`: :func:`train`, a new run or a resumed one.
"""
from .run import train
from .setup import TrainingError

__all__ = ['train', 'TrainingError']
