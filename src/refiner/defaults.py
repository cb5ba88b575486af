"""Training defaults derived from what a run is, for a user's dataset trained without a recipe.

:class:`~refiner.config.TrainConfig`'s defaults are DeiT's ImageNet recipe: 1.28M images at 224 px
and about 375k optimizer steps. Most folders a user trains on hold thousands of images and give
hundreds of steps, where that recipe's EMA never forgets its start, Mixup/CutMix and RandAugment at
ImageNet strength keep the loss near chance, and its learning rate is too low to get anywhere. Here
each value of the keys in :data:`DERIVABLE` follows from the run's number of training images, image
size and optimizer steps, and flipping from whether its images keep their class when mirrored
(:mod:`refiner.mirror`), with the reason the run prints. The rules are our own, written to
reproduce DeiT's values at DeiT's scale and this project's tuned recipes at theirs (measured in
docs/training.md); no library derives a recipe from a dataset.
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .mirror import MirrorCheck

__all__ = ['DERIVABLE', 'RunSize', 'derive', 'ema_start_share', 'EMA_REPORT_MAX_START_SHARE']

# the keys a run derives; any of them given by a flag or --set keeps the value given
DERIVABLE = ('lr', 'warmup_epochs', 'cooldown_epochs', 'drop_path', 'scale', 'ratio', 'hflip', 'aa', 'reprob',
             'mixup', 'cutmix', 'ema_decay', 'ema_warmup')

# DeiT's scale: the values of TrainConfig's defaults hold from here on
DEIT_STEPS = 300_000
LARGE_DATASET = 100_000  # images: DeiT's drop path from here on
MIX_MIN_STEPS, MIX_MIN_SIZE = 50_000, 64  # Mixup/CutMix only for long runs on images this large
# RandAugment and random erasing only for images of at least this side: under it, a shear, a shift or
# an erased box (up to a third of the image) removes what a small or off-centre object has of itself
AUGMENT_MIN_SIZE = 64
MAX_LR_BOOST = 10.0
# flips off when a mirrored image's nearest neighbour keeps under half of the accuracy above chance, if
# nearest neighbours on pixels are at least 0.1 above chance at all (refiner.mirror)
MIRROR_MIN_KEPT, MIRROR_MIN_SIGNAL = 0.5, 0.1
EMA_REPORT_MAX_START_SHARE = 0.1  # an EMA whose starting weights still weigh more than this is not reported


@dataclass(frozen=True)
class RunSize:
    """What the defaults are derived from."""
    num_train: int  # training images
    img_size: int  # input side in pixels
    epochs: int
    steps_per_epoch: int
    mirror: Optional[MirrorCheck] = None  # whether mirroring keeps the class; None: not measured

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def _fmt(value: Any) -> str:
    if value is None:
        return 'none'
    if isinstance(value, float):
        return f'{value:.4g}'
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(_fmt(v) for v in value) + ']'
    return str(value)


def derive(size: RunSize, keys: Sequence[str]) -> Tuple[Dict[str, Any], List[str]]:
    """The derived values of ``keys`` (a subset of :data:`DERIVABLE`) for a run of ``size``, and one
    line per value saying why. The learning rate is, as ``lr`` always is, for a global batch of
    ``lr_base_size`` images (512 unless set), scaled to the run's batch by timm's rule."""
    steps, side, n = max(size.steps, 1), size.img_size, size.num_train
    rules: Dict[str, Tuple[Any, str]] = {}
    # learning rate: DeiT's 5e-4 (per 512 images) is tuned for ~300k steps; a short run takes a larger
    # step, up to 10x, growing as the square root of how much shorter it is
    boost = min(max(math.sqrt(DEIT_STEPS / steps), 1.0), MAX_LR_BOOST)
    rules['lr'] = (5e-4 * boost, f'5e-4 x {boost:.3g} (sqrt({DEIT_STEPS:,} / {steps:,} steps), at most '
                                 f'{MAX_LR_BOOST:g}x: a short run takes larger steps)')
    warmup = round(min(5.0, 0.05 * size.epochs), 2)
    rules['warmup_epochs'] = (warmup, f'5% of the {size.epochs} epochs, at most 5')
    rules['cooldown_epochs'] = (min(10, round(size.epochs / 30)), f'one in 30 of the {size.epochs} epochs, at most 10')
    rules['drop_path'] = ((0.1, f'{n:,} images: DeiT\'s') if n >= LARGE_DATASET else
                          (0.05, f'{n:,} images, under {LARGE_DATASET:,}'))
    # crops: DeiT's smallest keeps 8% of a 224 px image (about 4,000 pixels); a crop of a smaller image
    # keeps at least as many pixels, and at least 70% of the image
    min_scale = round(min(max(0.08 * (224 / side) ** 2, 0.08), 0.7), 3)
    rules['scale'] = ([min_scale, 1.0], f'0.08 x (224 / {side} px)^2, between 0.08 and 0.7: a crop keeps as many '
                                        f'pixels as DeiT\'s smallest')
    rules['hflip'] = _hflip(size.mirror)
    small = side < AUGMENT_MIN_SIZE
    rules['ratio'] = (([0.85, 1.18], f'{side} px, under {AUGMENT_MIN_SIZE}: nearly square crops') if small else
                      ([0.75, 1.3333], f'{side} px: DeiT\'s'))
    rules['aa'] = ((None, f'off: RandAugment\'s shears and translations at {side} px, under {AUGMENT_MIN_SIZE}, '
                          f'move most of the image') if small else
                   ('rand-m9-mstd0.5-inc1', f'{side} px: DeiT\'s RandAugment'))
    rules['reprob'] = ((0.0, f'off: an erased box at {side} px, under {AUGMENT_MIN_SIZE}, hides most of an object')
                       if small else (0.25, f'{side} px: DeiT\'s random erasing'))
    mix = steps >= MIX_MIN_STEPS and side >= MIX_MIN_SIZE
    why = (f'{steps:,} steps and {side} px: DeiT\'s' if mix else
           f'off: {steps:,} steps (Mixup/CutMix need at least {MIX_MIN_STEPS:,}) at {side} px')
    rules['mixup'], rules['cutmix'] = (0.8 if mix else 0.0, why), (1.0 if mix else 0.0, why)
    # EMA: a horizon of a tenth of the run (decay 1 - 10 / steps), between 0.9 and DeiT's 0.99996, with
    # timm's warm-up so that its starting weights are soon forgotten
    decay = round(min(max(1.0 - 10.0 / steps, 0.9), 0.99996), 6)
    rules['ema_decay'] = (decay, f'1 - 10 / {steps:,} steps: an average over the last tenth of the run')
    rules['ema_warmup'] = (True, 'timm\'s EMA warm-up: the first steps count fully')
    values, lines = {}, []
    for key in DERIVABLE:
        if key in keys:
            values[key], why = rules[key]
            lines.append(f'  {key} {_fmt(values[key])}: {why}')
    return values, lines


def _hflip(check: Optional[MirrorCheck]) -> Tuple[float, str]:
    if check is None:
        return 0.5, ('DeiT\'s: mirroring not checked (the training labels cannot be listed, or fewer than two '
                     'classes have two readable images)')
    seen = (f'a nearest neighbour is right for {check.mirrored_accuracy:.0%} of {check.images:,} sampled images '
            f'mirrored, {check.accuracy:.0%} unmirrored, chance {check.chance:.0%}')
    if check.accuracy - check.chance < MIRROR_MIN_SIGNAL:
        return 0.5, (f'DeiT\'s: nearest neighbours on pixels tell nothing of mirroring here ({check.accuracy:.0%} '
                     f'right, chance {check.chance:.0%})')
    if check.kept >= MIRROR_MIN_KEPT:
        return 0.5, f'DeiT\'s: mirrored images keep their class ({seen})'
    return 0.0, f'off: a mirrored image is another class or none ({seen})'


def ema_start_share(get_decay, steps: int) -> float:
    """How much of an EMA after ``steps`` updates is still the weights it started from: the product of
    the decays ``get_decay(step)`` of every update (timm's ModelEmaV3.get_decay; the first update
    copies the weights, so the start is the model after step 1)."""
    log_share = 0.0
    for step in range(1, steps + 1):
        decay = get_decay(step)
        if decay <= 0.0:
            log_share = 0.0  # this update replaced the average with the weights
            continue
        log_share += math.log(decay)
    return math.exp(log_share)
