"""Whether mirroring keeps an image's class, measured on the training images: the derived ``hflip``'s evidence.

DeiT flips every other training image left to right, right for photographs and clothing, wrong for
digits or text, where a mirrored image shows another class or none. Nothing in a dataset's size says
which it is, so the derived defaults look: on a class-balanced sample of the training images (grey,
16 px, each centred and scaled to unit norm) a leave-one-out nearest neighbour classifies every image
and its mirror image against the unmirrored others. If mirroring keeps the class, the mirrored images'
neighbours are right about as often as the images' own; if it does not, they fall towards chance.
Written here because no library measures label-preserving symmetries of a dataset.
"""
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np

__all__ = ['MirrorCheck', 'measure_mirror']

SAMPLE_IMAGES = 2000  # images drawn, evenly over the classes (at least 2 of each)
SIDE = 16  # the side, in pixels, the images are compared at


@dataclass(frozen=True)
class MirrorCheck:
    """Leave-one-out nearest-neighbour accuracy of a sample's images and of their mirror images."""
    images: int
    accuracy: float
    mirrored_accuracy: float
    chance: float  # the accuracy of a neighbour of random class (sum of squared class shares)

    @property
    def kept(self) -> float:
        """The share of the above-chance accuracy that mirroring keeps: 1 when it keeps the class, 0 or
        less when a mirrored image looks like no class or another one; nan when nothing is above chance."""
        above = self.accuracy - self.chance
        return (self.mirrored_accuracy - self.chance) / above if above > 0 else float('nan')


def _pixels(img: Any) -> Optional[np.ndarray]:
    if img is None:
        return None
    from PIL import Image
    arr = np.asarray(img.convert('L').resize((SIDE, SIDE), Image.BILINEAR), dtype=np.float64)
    arr = arr - arr.mean()
    norm = np.linalg.norm(arr)
    return arr / norm if norm > 0 else arr


def measure_mirror(dataset: Any, seed: int = 0) -> Optional[MirrorCheck]:
    """The check on ``dataset`` (a refiner dataset: ``targets`` and ``load(index)``), on a sample drawn with
    ``seed``; None when it has no labels, they cannot be listed without decoding every image, or fewer than two
    classes have two readable images."""
    targets = getattr(dataset, 'targets', None)
    if targets is None or len(targets) == 0:
        return None
    targets = np.asarray(targets)
    classes = np.unique(targets)
    per_class = max(2, SAMPLE_IMAGES // len(classes))
    rng = np.random.default_rng(seed)
    images: List[np.ndarray] = []
    labels: List[int] = []
    for c in classes:
        members = np.flatnonzero(targets == c)
        for index in rng.permutation(members)[:per_class]:
            img, target, _ = dataset.load(int(index))
            pixels = _pixels(img)
            if pixels is not None:
                images.append(pixels)
                labels.append(int(target))
    y = np.asarray(labels)
    counts = np.bincount(y) if len(y) else np.zeros(0)
    if (counts >= 2).sum() < 2:
        return None
    x = np.stack(images)  # (M, SIDE, SIDE)
    flat, mirrored = x.reshape(len(x), -1), x[:, :, ::-1].reshape(len(x), -1)

    def accuracy(queries: np.ndarray) -> float:
        similarity = queries @ flat.T  # (M, M): cosine similarity, the images being unit vectors
        np.fill_diagonal(similarity, -np.inf)  # leave one out: an image is not its own (or its mirror's) neighbour
        return float((y[similarity.argmax(1)] == y).mean())

    shares = counts[counts > 0] / len(y)
    return MirrorCheck(images=len(y), accuracy=accuracy(flat), mirrored_accuracy=accuracy(mirrored),
                       chance=float((shares ** 2).sum()))
