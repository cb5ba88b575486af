"""Fashion-MNIST read from its four IDX files: a folder, torchvision's layout, or Debian's package.

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv 1708.07747): 60,000 training and 10,000 test
images of clothing, 28×28 grey, ten classes. Nothing is downloaded: the files are found in the
folder given (``--data fashion_mnist:DIR``; the files themselves, or torchvision's
``DIR/FashionMNIST/raw``), or, with no folder, where the Debian package ``dataset-fashion-mnist``
installs them. The IDX reader is a few lines of numpy, written here because torchvision's reader
lives behind its downloading dataset class and no other installed package reads IDX.
"""
import gzip
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .errors import RefinerError

__all__ = ['CLASSES', 'DEBIAN_DIR', 'FILES', 'read_idx', 'find_files', 'load_split', 'FashionMNISTError']

CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
DEBIAN_DIR = Path('/usr/share/datasets/fashion-mnist')  # where `apt-get install dataset-fashion-mnist` puts them
FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
         'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'), 0x0D: np.dtype('>f4'),
           0x0E: np.dtype('>f8')}


class FashionMNISTError(RefinerError, ValueError):
    """Fashion-MNIST files that are missing or not IDX; the message says how to get them."""


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as an array: magic 0x0000TTDD (T: element type, D: dimensions),
    then D big-endian int32 sizes, then the elements."""
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a corrupt gzip body
        raise FashionMNISTError(f'{path}: could not be read ({e})') from None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _DTYPES:
        raise FashionMNISTError(f'{path}: not an IDX file (expected the magic 0x0000TTDD)')
    dtype, ndim = np.dtype(_DTYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise FashionMNISTError(f'{path}: an IDX header of {ndim} dimensions needs {4 + 4 * ndim} bytes, the file '
                                f'has {len(raw)} (truncated?)')
    shape = tuple(int(s) for s in np.frombuffer(raw, '>i4', count=ndim, offset=4))
    offset, count = 4 + 4 * ndim, int(np.prod(shape))
    if len(raw) - offset != count * dtype.itemsize:
        raise FashionMNISTError(f'{path}: an IDX file of shape {shape} should hold {count * dtype.itemsize} bytes of '
                                f'data, it holds {len(raw) - offset} (truncated?)')
    return np.frombuffer(raw, dtype, count=count, offset=offset).reshape(shape)


def _candidates(root: Optional[Path]) -> List[Path]:
    if root is None:
        return [DEBIAN_DIR]
    return [root, root / 'FashionMNIST' / 'raw', root / 'raw']


def find_files(root: Optional[Path], split: str) -> Tuple[Path, Path]:
    """The (images, labels) files of ``split`` ('train' or 'test'), plain or ``.gz``."""
    for folder in _candidates(root):
        found = []
        for stem in FILES[split]:
            path = next((p for p in (folder / stem, folder / f'{stem}.gz') if p.is_file()), None)
            found.append(path)
        if all(found):
            return found[0], found[1]
    names = ', '.join(f'{stem}[.gz]' for s in FILES.values() for stem in s)
    if root is None:
        raise FashionMNISTError(f'Fashion-MNIST is not installed: `apt-get install dataset-fashion-mnist` puts it in '
                                f'{DEBIAN_DIR}, or give --data fashion_mnist:DIR with a folder holding {names}')
    raise FashionMNISTError(f'--data fashion_mnist:{root}: expected the Fashion-MNIST files {names} in {root}, '
                            f'{root}/FashionMNIST/raw (torchvision\'s layout) or {root}/raw; or install the Debian '
                            f'package dataset-fashion-mnist and give no folder')


def load_split(root: Optional[Path], split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of ``split``; checked against each other."""
    image_path, label_path = find_files(root, split)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise FashionMNISTError(f'{image_path}: expected (N, H, W) uint8 images, got {images.dtype} {images.shape}')
    if labels.shape != images.shape[:1]:
        raise FashionMNISTError(f'{label_path}: {labels.shape[0] if labels.ndim else 0} labels for '
                                f'{images.shape[0]} images in {image_path}')
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise FashionMNISTError(f'{label_path}: labels must lie in 0..{len(CLASSES) - 1}, '
                                f'got {labels.min()}..{labels.max()}')
    return images, labels
