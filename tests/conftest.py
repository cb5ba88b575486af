import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

import refiner  # noqa: F401  (registers the models)
from refiner.checkpoint import save_weights
from refiner.config import TrainConfig, apply_overrides, load_recipe
from refiner.train import train

DATA = Path(__file__).parent / 'data'


@pytest.fixture(scope='session')
def official():
    """The two parity fixtures: outputs of the authors' original model (see tests/data/README.md)."""
    names = ('official_tiny', 'official_tiny_dense')
    return {name: torch.load(DATA / f'{name}.pt', weights_only=True) for name in names}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, the parity measure."""
    return ((a - b).abs().max() / b.abs().max()).item()


def trained_scale(model):
    """Weights of trained size: BatchNorm statistics and affines, layer scales near 1 (not the 1e-5
    init, under which removing every MLP moves the logits by 1.5e-5 relative) and non-zero biases,
    so that a bug in any branch of the exported model shows in its outputs."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-.1, .1)
            m.running_var.uniform_(.5, 1.5)
            m.weight.data.uniform_(.5, 1.5)
            m.bias.data.uniform_(-.2, .2)
        elif isinstance(m, timm.layers.LayerScale):
            m.gamma.data.uniform_(.5, 1.5)
        elif isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias.data.normal_(0, .02)
    return model.eval()


FINETUNE_NANO = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)  # a tiny Refiner-ViT on 16x16 digits


def finetune_cfg(**kw) -> TrainConfig:
    """The default recipe, shortened; model=None: the architecture the finetune source names."""
    base = dict(load_recipe('default'), epochs=1, batch_size=32, train_fraction=0.15, warmup_epochs=0,
                ema=False, model_args=dict(FINETUNE_NANO))
    if kw.get('model', '') is None:
        base.update(model=None, model_args={})
    return apply_overrides(base, kw)


@pytest.fixture(scope='session')
def pretrained_run(tmp_path_factory):
    """A tiny Refiner-ViT trained on digits 0-4: the 'pretrained weights' of these tests."""
    out = tmp_path_factory.mktemp('pre') / 'run'
    train(finetune_cfg(classes=[0, 1, 2, 3, 4], epochs=2, train_fraction=0.5), out=str(out), progress=False)
    return out


FINETUNE_VIT = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)  # a tiny timm ViT on 16x16 digits


@pytest.fixture(scope='session')
def vit_run(tmp_path_factory):
    """A tiny timm ViT trained on all digits, and its weights as a bare timm state-dict file."""
    root = tmp_path_factory.mktemp('vit')
    summary = train(finetune_cfg(model='vit_tiny_patch16_224', model_args=dict(FINETUNE_VIT), epochs=2,
                                  train_fraction=0.3), out=str(root / 'run'), progress=False)
    state = load_file(str(root / 'run' / 'model.safetensors'))
    torch.save({'model': {f'module.{k}': v for k, v in state.items()}}, root / 'vit.pth')  # DeiT's layout
    return root, summary


NANO_CHECKPOINT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)


NANO_DATA_CONFIG = dict(input_size=[3, 16, 16], mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0, interpolation='bilinear')


@pytest.fixture
def nano_checkpoint(tmp_path):
    """A tiny Refiner-ViT's weights file, as a run writes it: 16x16 inputs, three named classes."""
    torch.manual_seed(0)
    model = trained_scale(timm.create_model('refiner_vit_nano', **NANO_CHECKPOINT))
    path = save_weights(model, tmp_path / 'model.safetensors', 'refiner_vit_nano', NANO_CHECKPOINT,
                        extra={'data_config': NANO_DATA_CONFIG, 'classes': ['cat', 'dog', 'owl']})
    return path, model


LEARNING_ARGS = {'patch_size': 4, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}


def _learning_cfg(**overrides):
    return apply_overrides(load_recipe('default'), dict(dict(model_args=dict(LEARNING_ARGS)), **overrides))


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory):
    """A tiny Refiner-ViT (one attention, one refining block) trained for 5 short epochs on the digits."""
    out = tmp_path_factory.mktemp('learn') / 'run'
    cfg = _learning_cfg(epochs=5, batch_size=32, warmup_epochs=0, lr=0.08, seed=0)
    summary = train(cfg, out=str(out), progress=False)
    return out, summary


# ------------------------------------------------------------------ tiny Fashion-MNIST files

N_TRAIN, N_TEST = 60, 20  # six and two images of each class


def _idx(array: np.ndarray) -> bytes:
    """An IDX file's bytes: magic 0x0000TTDD (0x08: uint8), the sizes, the elements."""
    return struct.pack('>BBBB', 0, 0, 0x08, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape) + \
        array.astype(np.uint8).tobytes()


def fashion_mnist_images(n: int, seed: int) -> tuple:
    """Images whose class shows in them (a bright band at a class-dependent row) and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 + 2 * c: 4 + 2 * c] = 250
    return images, labels


def write_fashion_mnist(folder, gz: bool = True, n_train: int = N_TRAIN, n_test: int = N_TEST):
    """The four Fashion-MNIST files of a tiny dataset in ``folder``; returns (train, test) label arrays."""
    from refiner import fashion_mnist
    folder.mkdir(parents=True, exist_ok=True)
    splits = {'train': fashion_mnist_images(n_train, 0), 'test': fashion_mnist_images(n_test, 1)}
    for split, (images, labels) in splits.items():
        for stem, array in zip(fashion_mnist.FILES[split], (images, labels)):
            data = _idx(array)
            if gz:
                (folder / f'{stem}.gz').write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
    return splits['train'][1], splits['test'][1]

# ------------------------------------------------------------------ shared by several test files

def tiny_refiner(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model('refiner_vit_nano', img_size=16, embed_dim=32, depth=4, num_heads=2,
                              num_classes=10, **kw).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so that refinement changes the map
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model


def hsic1(K, L):
    """Song et al. (2012), eq. 5: the unbiased HSIC estimator of two n×n kernels, in float64."""
    n = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))


def cka_minibatch(batches_x, batches_y):
    """Nguyen et al. (2021): Σ HSIC1(K_i, L_i) / sqrt(Σ HSIC1(K_i, K_i) · Σ HSIC1(L_i, L_i)), linear kernels."""
    kl = kk = ll = 0.0
    for x, y in zip(batches_x, batches_y):
        K, L = x @ x.T, y @ y.T
        kl, kk, ll = kl + hsic1(K, L), kk + hsic1(K, K), ll + hsic1(L, L)
    return kl / math.sqrt(kk * ll)


TINY_VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)  # a tiny timm ViT


def refined_vit(img_size=16, num_classes=3):
    torch.manual_seed(1)
    model = timm.create_model('refined_vit', base_model='vit_tiny_patch16_224', refine_blocks=[1], img_size=img_size,
                              num_classes=num_classes, **TINY_VIT)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return trained_scale(model)


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             num_classes=10).eval()
