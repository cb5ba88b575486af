"""Datasets: the embedded digits, Fashion-MNIST, image folders and timm's specs, decoded robustly.

- ``digits``: scikit-learn's handwritten digits (1,797 8×8 grey images, 10 classes), shipped
  inside the installed package, so the default run needs no download. A fixed stratified split
  (25% held out, seed 0) is the evaluation set; training never sees it.
- ``digits_clutter``: the same digits, harder, and where locality matters: each one upsampled to
  16×16 at a random place on a 32×32 canvas among pieces of other digits (cluttered MNIST, Mnih et
  al. 2014, at the digits' scale). Generated once from a fixed seed; same split, same classes.
- ``fashion_mnist`` (``fashion_mnist:DIR``): Fashion-MNIST's 60,000 training images; its official
  10,000 test images are the held-out split (see :mod:`refiner.fashion_mnist`; never downloaded).
- ``--data DIR``: an ImageFolder layout (``DIR/train/<class>/*``, ``DIR/val/<class>/*``), or a
  timm dataset spec that can be indexed (``torch/...``, ``hfds/...``) through timm's dataset factory,
  with its class names; a fraction or a class subset where its labels can be listed. timm's streamed
  readers (``tfds/``, ``hfids/``, ``wds/``) are refused: the resumable sampler draws by index.

Images are decoded robustly (grey, palette, RGBA, CMYK and 16-bit images become 8-bit RGB; files
that cannot be read are skipped and counted, never a crash). How a run draws them (seeded
augmentation, the resumable sampler) is :mod:`refiner.sampling`'s job; its names are re-exported here.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from . import fashion_mnist
from .data_specs import EMBEDDED_DATASETS, STREAMED_PREFIXES, parse_data_spec
from .errors import RefinerError
from .sampling import EpochSampler, SeededTransformDataset, SkipLog, collate_skipping

__all__ = [
    'DataError', 'SkipLog', 'build_datasets', 'collate_skipping', 'load_rgb', 'EpochSampler', 'SeededTransformDataset',
    'safe_posterize', 'eval_transform', 'EMBEDDED_DATASETS', 'dataset_targets',
]

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


class DataError(RefinerError, ValueError):
    """A dataset that cannot be used as given; the message says what was expected."""


def eval_transform(data_config: Dict[str, Any]) -> Callable:
    """The evaluation preprocessing of a data config (``input_size``, ``mean``, ``std``,
    ``crop_pct``, ``interpolation``): resize, center crop, normalise, with timm's factory."""
    from timm.data import create_transform
    return create_transform(data_config['input_size'][-1], is_training=False,
                            interpolation=data_config['interpolation'], mean=tuple(data_config['mean']),
                            std=tuple(data_config['std']), crop_pct=data_config['crop_pct'])


def load_rgb(path: str) -> Image.Image:
    """Open an image as 8-bit RGB: grey, palette, RGBA/LA (composited on white), CMYK and 16-bit or
    float images are converted; raises on a file that is not a readable image."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if mode.startswith('I;16') else (float(arr.min()), float(arr.max()))
        arr = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, 'L').convert('RGB')
    if mode == 'P':
        img = img.convert('RGBA') if 'transparency' in img.info else img.convert('RGB')
        mode = img.mode
    if mode in ('RGBA', 'LA', 'PA'):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return img.convert('RGB') if mode != 'RGB' else img


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Posterize that also accepts 0 bits (a black image), as Pillow < 13 did; timm's RandAugment
    'increasing' posterize asks for 0 bits at high magnitudes, which Pillow 13 rejects."""
    from PIL import ImageOps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def safe_posterize(transform: Callable) -> Callable:
    """Give every posterize op of a timm RandAugment / AutoAugment in ``transform`` the tolerant
    version above (in place; returns the transform)."""
    for t in getattr(transform, 'transforms', [transform]):
        for op in list(getattr(t, 'ops', [])) + [o for policy in getattr(t, 'policy', []) for o in policy]:
            if 'Posterize' in getattr(op, 'name', ''):
                op.aug_fn = _posterize
    return transform


class FolderDataset(Dataset):
    """``root/<class>/<image>`` with sorted class folders; a file that cannot be decoded yields
    None (counted by :func:`collate_skipping`) instead of an exception."""

    def __init__(self, root: Path, classes: Optional[Sequence[str]] = None) -> None:
        self.root = root
        if classes is None:
            classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith('.'))
        self.classes = list(classes)
        self.samples: List[Tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            folder = root / name
            if not folder.is_dir():
                continue
            for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith('.'):
                        self.samples.append((os.path.join(dirpath, f), label))
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Tuple[Optional[Image.Image], int, str]:
        path, target = self.samples[index]
        try:
            return load_rgb(path), target, path
        except Exception:  # unreadable, truncated or not an image: skipped and reported, not fatal
            return None, target, path


class ArrayDataset(Dataset):
    """Images held in memory as uint8 arrays (N, H, W) or (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: Sequence[str]) -> None:
        self.images, self.targets, self.classes = images, [int(t) for t in targets], list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Tuple[Optional[Image.Image], int, str]:
        arr = self.images[index]
        img = Image.fromarray(arr, 'L' if arr.ndim == 2 else 'RGB').convert('RGB')
        return img, self.targets[index], f'#{index}'


class TimmDataset(Dataset):
    """A timm dataset (``create_dataset``) whose samples are (PIL image, target), optionally a subset
    of its ``indices`` with its targets relabelled by ``relabel`` (old label -> new label)."""

    def __init__(self, ds: Any, indices: Optional[Sequence[int]] = None,
                 relabel: Optional[Dict[int, int]] = None, classes: Optional[Sequence[str]] = None) -> None:
        self.ds, self.relabel = ds, relabel
        reader = getattr(ds, 'reader', None)
        # timm's readers map names to labels; torchvision's datasets (torch/...) list their names
        names = list(getattr(reader, 'class_to_idx', None) or getattr(ds, 'classes', None) or [])
        self.classes = [str(c) for c in (classes if classes is not None else names)]
        self.indices = list(indices) if indices is not None else None
        self.targets = dataset_targets(ds)
        if self.targets is not None:
            self.targets = [self.targets[i] for i in (self.indices or range(len(self.targets)))]
            if relabel is not None:
                self.targets = [relabel[t] for t in self.targets]

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.ds)

    def load(self, index: int) -> Tuple[Optional[Image.Image], int, str]:
        i = self.indices[index] if self.indices is not None else index
        try:
            img, target = self.ds[i]
            target = int(target)
            return to_rgb(img), self.relabel[target] if self.relabel is not None else target, f'#{i}'
        except Exception:
            return None, -1, f'#{i}'


def dataset_targets(ds: Any) -> Optional[List[int]]:
    """Every sample's label without decoding an image: torchvision's ``targets`` or a timm reader's
    ``samples``; None for a dataset that does not list them (an iterable one)."""
    targets = getattr(ds, 'targets', None)
    if targets is None:
        samples = getattr(getattr(ds, 'reader', None), 'samples', None)
        if samples is None:
            return None
        targets = [s[1] for s in samples]
    return [int(t) for t in (targets.tolist() if hasattr(targets, 'tolist') else targets)]


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    classes: List[str]
    description: str
    num_train: int
    num_val: int
    in_chans: int = 3
    default_img_size: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def _check_classes(wanted: Sequence[str], available: Sequence[str], where: str) -> List[str]:
    wanted = [str(c) for c in wanted]
    unknown = [c for c in wanted if c not in available]
    if unknown or len(set(wanted)) != len(wanted) or len(wanted) < 2:
        raise DataError(f'classes {wanted}: expected at least two distinct classes of {where} '
                        f'({", ".join(available[:20])}{", ..." if len(available) > 20 else ""})')
    return wanted


CLUTTER_CANVAS, CLUTTER_PIECES, CLUTTER_PIECE_SIZE = 32, 4, 6  # digits_clutter: canvas side, pieces per image


def _clutter(digits: np.ndarray, seed: int) -> np.ndarray:
    """Each digit (N, 8, 8), upsampled to 16×16, at a random place on a CLUTTER_CANVAS square among
    CLUTTER_PIECES random CLUTTER_PIECE_SIZE squares cut from other digits of the same set (so no
    piece of a held-out digit reaches the training images); overlaps keep the brighter pixel."""
    rng = np.random.default_rng(seed)
    big = digits.repeat(2, axis=1).repeat(2, axis=2)  # (N, 16, 16)
    n, side, piece = len(digits), big.shape[1], CLUTTER_PIECE_SIZE
    out = np.zeros((n, CLUTTER_CANVAS, CLUTTER_CANVAS), np.uint8)
    for i in range(n):
        for _ in range(CLUTTER_PIECES):
            j = (i + rng.integers(1, n)) % n  # any other digit
            sy, sx = rng.integers(0, side - piece + 1, size=2)
            y, x = rng.integers(0, CLUTTER_CANVAS - piece + 1, size=2)
            window = out[i, y:y + piece, x:x + piece]
            np.maximum(window, big[j, sy:sy + piece, sx:sx + piece], out=window)
        y, x = rng.integers(0, CLUTTER_CANVAS - side + 1, size=2)
        window = out[i, y:y + side, x:x + side]
        np.maximum(window, big[i], out=window)
    return out


def _from_arrays(images: np.ndarray, targets: np.ndarray, tr: np.ndarray, va: np.ndarray, names: List[str],
                 fraction: float, fraction_seed: int, classes: Optional[Sequence[str]], where: str
                 ) -> Tuple[ArrayDataset, ArrayDataset, List[str]]:
    """The training images ``tr`` and held-out images ``va`` (indices into ``images``) of an in-memory
    dataset, restricted to ``classes`` (relabelled 0..k-1 in the given order) and a stratified
    ``fraction`` of the training split."""
    if classes is not None:
        names_all = names
        names = _check_classes(classes, names_all, where)
        relabel = np.full(len(names_all), -1)
        relabel[[names_all.index(c) for c in names]] = np.arange(len(names))
        targets = relabel[targets]
        tr, va = tr[targets[tr] >= 0], va[targets[va] >= 0]
    tr = _subset(tr, targets[tr], fraction, fraction_seed)
    return ArrayDataset(images[tr], targets[tr], names), ArrayDataset(images[va], targets[va], names), names


def _digits(fraction: float, fraction_seed: int, classes: Optional[Sequence[str]] = None,
            clutter: bool = False) -> Datasets:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(digits.images / 16.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)  # (1797, 8, 8)
    tr, va = train_test_split(np.arange(len(images)), test_size=0.25, random_state=0, stratify=digits.target)
    if clutter:  # each split cluttered with pieces of its own digits, before any class or fraction is taken
        canvas = np.zeros((len(images), CLUTTER_CANVAS, CLUTTER_CANVAS), np.uint8)
        canvas[tr], canvas[va] = _clutter(images[tr], seed=1), _clutter(images[va], seed=2)
        images = canvas
    train, val, names = _from_arrays(images, digits.target, tr, va, [str(c) for c in range(10)], fraction,
                                     fraction_seed, classes, 'the digits')
    side = images.shape[-1]
    return Datasets(train, val, names, f'scikit-learn digits{" cluttered" if clutter else ""}'
                    f'{"" if classes is None else " " + ",".join(names)}: {len(train)} train / {len(val)} held-out '
                    f'images, {side}x{side} grey', len(train), len(val), default_img_size=32 if clutter else 16)


def _fashion_mnist(root: Optional[str], fraction: float, fraction_seed: int,
                   classes: Optional[Sequence[str]] = None) -> Datasets:
    """Fashion-MNIST's 60,000 training images and, held out, its official 10,000 test images."""
    try:
        train_images, train_targets = fashion_mnist.load_split(Path(root).expanduser() if root else None, 'train')
        test_images, test_targets = fashion_mnist.load_split(Path(root).expanduser() if root else None, 'test')
    except fashion_mnist.FashionMNISTError as e:
        raise DataError(str(e)) from None
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f'--data fashion_mnist{":" + root if root else ""}: the training images are '
                        f'{"x".join(map(str, train_images.shape[1:]))} pixels, the test images '
                        f'{"x".join(map(str, test_images.shape[1:]))}; expected one size (28x28)')
    images = np.concatenate([train_images, test_images])  # (70000, 28, 28)
    targets = np.concatenate([train_targets, test_targets])
    tr, va = np.arange(len(train_images)), np.arange(len(train_images), len(images))
    train, val, names = _from_arrays(images, targets, tr, va, list(fashion_mnist.CLASSES), fraction, fraction_seed,
                                     classes, 'Fashion-MNIST')
    side = images.shape[-1]
    return Datasets(train, val, names, f'Fashion-MNIST{"" if classes is None else " " + ",".join(names)}: '
                    f'{len(train)} train / {len(val)} test images, {side}x{side} grey', len(train), len(val),
                    default_img_size=side)


def _subset(indices: np.ndarray, targets: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified ``fraction`` of ``indices`` (at least one sample per class)."""
    if fraction >= 1.0:
        return indices
    if not 0.0 < fraction:
        raise DataError(f'train fraction must be in (0, 1], got {fraction}')
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(targets):
        members = indices[targets == c]
        k = max(1, int(round(len(members) * fraction)))
        keep.extend(rng.choice(members, size=k, replace=False).tolist())
    return np.array(sorted(keep))


def _image_folder(root: Path, fraction: float, fraction_seed: int, classes: Optional[Sequence[str]] = None
                  ) -> Datasets:
    if not root.exists():
        raise DataError(f'--data {root}: no such directory')
    if not root.is_dir():
        raise DataError(f'--data {root}: expected a directory with train/ and val/ subfolders, got a file')
    train_dir, val_dir = root / 'train', root / 'val'
    if not train_dir.is_dir() or not val_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())[:6]
        raise DataError(f'--data {root}: expected train/ and val/ subfolders with one folder per class '
                        f'(found {found or "no folders"})')
    if classes is not None:
        found = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith('.'))
        classes = _check_classes(classes, found, train_dir)
    train = FolderDataset(train_dir, classes)
    if not train.classes:
        raise DataError(f'{train_dir}: no class folders (expected {train_dir}/<class>/<image>)')
    if len(train) == 0:
        raise DataError(f'{train_dir}: no image files ({", ".join(IMG_EXTENSIONS)}) in its class folders')
    val = FolderDataset(val_dir, classes=train.classes)
    unknown = sorted(d.name for d in val_dir.iterdir() if d.is_dir() and d.name not in train.classes)
    if unknown and classes is None:
        raise DataError(f'{val_dir}: class folders {unknown[:5]} do not exist in {train_dir}')
    if len(val) == 0:
        raise DataError(f'{val_dir}: no image files in its class folders')
    if fraction < 1.0:
        idx = _subset(np.arange(len(train)), np.array(train.targets), fraction, fraction_seed)
        train.samples = [train.samples[i] for i in idx]
        train.targets = [t for _, t in train.samples]
    return Datasets(train, val, train.classes, f'{root}: {len(train)} train / {len(val)} val images, '
                    f'{len(train.classes)} classes', len(train), len(val))


def _timm_spec(spec: str, root: Optional[str], fraction: float, fraction_seed: int,
               classes: Optional[Sequence[str]] = None) -> Datasets:
    from timm.data import create_dataset
    reader = spec.split('/', 1)[0]
    if reader in STREAMED_PREFIXES:
        raise DataError(f'--data {spec}: timm streams {reader}/ datasets (iterable, no index), and '
                        f'refiner samples by index (resumable, seeded); use hfds/..., torch/... or an image folder')
    try:
        train = create_dataset(spec, root=root, split='train', is_training=True)
        val = create_dataset(spec, root=root, split='validation' if spec.startswith(('tfds', 'hfds')) else 'val')
    except Exception as e:
        raise DataError(f'could not open timm dataset {spec!r}: {e}') from None
    tr, va = TimmDataset(train), TimmDataset(val)
    if fraction < 1.0 or classes is not None:
        if tr.targets is None or va.targets is None or not tr.classes:
            what = ', '.join(w for w, on in (('--train-fraction', fraction < 1.0), ('--classes', classes)) if on)
            raise DataError(f'{what}: timm dataset {spec} does not list its labels and class names without reading '
                            f'every image; use an image folder, a torch/... spec or fashion_mnist for that')
        names = tr.classes
        keep, relabel = np.arange(len(tr)), None
        if classes is not None:
            names = _check_classes(classes, tr.classes, spec)
            relabel = {tr.classes.index(c): i for i, c in enumerate(names)}
        targets, val_targets = np.array(tr.targets), np.array(va.targets)
        if relabel:  # relabelled before the fraction is drawn, as _from_arrays does
            keep = keep[np.isin(targets, list(relabel))]
            targets = np.array([relabel.get(int(t), -1) for t in targets])
        keep = _subset(keep, targets[keep], fraction, fraction_seed)
        val_keep = np.flatnonzero(np.isin(val_targets, list(relabel))) if relabel else None
        tr = TimmDataset(train, keep.tolist(), relabel, names)
        va = TimmDataset(val, None if val_keep is None else val_keep.tolist(), relabel, names)
    return Datasets(tr, va, tr.classes, f'timm dataset {spec}: {len(tr)} train / {len(va)} val images, '
                    f'{len(tr.classes)} classes', len(tr), len(va))


def build_datasets(data: Optional[str], fraction: float = 1.0, fraction_seed: int = 0,
                   classes: Optional[Sequence[str]] = None) -> Datasets:
    """``None`` or ``'digits'``: the embedded default; ``'digits_clutter'``: its cluttered form;
    ``'fashion_mnist'`` (``:DIR`` optional): Fashion-MNIST's IDX files; a directory: ImageFolder;
    ``name/...``: a timm spec. ``fraction`` keeps a stratified fraction of the training split;
    ``classes`` keeps only those classes (relabelled 0..k-1 in that order), e.g. to pretrain on some
    classes and fine-tune on the others."""
    spec = parse_data_spec(data)
    if spec.kind in EMBEDDED_DATASETS:
        return _digits(fraction, fraction_seed, classes, clutter=spec.kind == 'digits_clutter')
    if spec.kind == 'fashion_mnist':
        return _fashion_mnist(spec.root, fraction, fraction_seed, classes)
    if spec.kind == 'timm':
        return _timm_spec(spec.name, spec.root, fraction, fraction_seed, classes)
    return _image_folder(Path(spec.name).expanduser(), fraction, fraction_seed, classes)
