"""What a ``--data`` value names: an embedded dataset, Fashion-MNIST, a timm spec, or an image folder.

One reading of the spec for everything that depends on it: :func:`refiner.data.build_datasets`
builds the datasets from it, :func:`refiner.config.default_recipe` picks the recipe of a dataset
refiner knows, and evaluation, the ablation's run reuse and ``refiner analyze summary`` tell whether
two specs name one dataset (:func:`dataset_key`). A dataset's name wins over a folder of that name in
the working directory (``fashion_mnist`` is Fashion-MNIST even beside a folder called so;
``./fashion_mnist`` is the folder), as timm reads its specs.
"""
from typing import NamedTuple, Optional, Tuple

__all__ = ['EMBEDDED_DATASETS', 'TIMM_SPEC_PREFIXES', 'STREAMED_PREFIXES', 'DataSpec', 'parse_data_spec', 'dataset_key']

EMBEDDED_DATASETS = ('digits', 'digits_clutter')  # shipped inside the installed package
TIMM_SPEC_PREFIXES = ('tfds', 'hfds', 'hfids', 'wds', 'torch')  # timm's create_dataset readers, 'torch/cifar10'
STREAMED_PREFIXES = ('tfds', 'hfids', 'wds')  # timm reads these as iterable datasets: no index, no length


class DataSpec(NamedTuple):
    """``kind``: 'digits', 'digits_clutter', 'fashion_mnist', 'timm' or 'folder'; ``name``: the timm
    spec without its root, or the folder; ``root``: the folder after ':' (Fashion-MNIST, timm), or None."""
    kind: str
    name: str
    root: Optional[str]


def parse_data_spec(data: Optional[str]) -> DataSpec:
    """``None`` or '' -> the embedded digits; 'digits_clutter'; 'fashion_mnist[:DIR]'; 'torch/NAME[:DIR]'
    (and timm's other readers); anything else: an image folder."""
    if data in (None, ''):
        return DataSpec('digits', 'digits', None)
    if data in EMBEDDED_DATASETS:
        return DataSpec(data, data, None)
    name, _, root = data.partition(':')
    if name == 'fashion_mnist':
        return DataSpec('fashion_mnist', name, root or None)
    if '/' in name and name.split('/', 1)[0] in TIMM_SPEC_PREFIXES:
        return DataSpec('timm', name, root or None)
    return DataSpec('folder', data, None)


def dataset_key(data: Optional[str]) -> Tuple[str, str]:
    """What identifies the dataset a spec names, whatever folder it is read from: ``fashion_mnist`` and
    ``fashion_mnist:DIR`` (or ``torch/cifar10:A`` and ``:B``) are one dataset. Evaluation, the ablation's
    run reuse and ``refiner analyze summary`` compare datasets by it."""
    spec = parse_data_spec(data)
    return spec.kind, spec.name
