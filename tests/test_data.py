"""Data pipeline: robust decoding, reproducible sampling and augmentation, timm RandAugment safety."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from refiner.data import EpochSampler, SeededTransformDataset, build_datasets, load_rgb, safe_posterize


def test_load_rgb_converts_every_mode(tmp_path):
    arr = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 200
    Image.fromarray(arr).save(tmp_path / 'sixteen.png')
    img = load_rgb(str(tmp_path / 'sixteen.png'))
    assert img.mode == 'RGB'
    grey = np.asarray(img)[..., 0].astype(int)
    assert grey.max() > 150 and grey.min() == 0  # scaled from 16 bits, not clipped to white
    rgba = Image.new('RGBA', (4, 4), (255, 0, 0, 0))  # fully transparent: composited on white
    rgba.save(tmp_path / 'rgba.png')
    assert np.asarray(load_rgb(str(tmp_path / 'rgba.png'))).min() == 255
    Image.new('CMYK', (4, 4), (0, 255, 0, 0)).save(tmp_path / 'cmyk.jpg')
    assert load_rgb(str(tmp_path / 'cmyk.jpg')).mode == 'RGB'
    (tmp_path / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    with pytest.raises((OSError, SyntaxError, ValueError)):  # PIL's errors for a broken file
        load_rgb(str(tmp_path / 'bad.png'))


def test_rand_augment_posterize_never_fails():
    """timm's 'increasing' posterize asks Pillow for 0 bits at high magnitude; Pillow 13 rejects it."""
    tf = safe_posterize(create_transform(32, is_training=True, auto_augment='rand-m9-mstd0.5-inc1'))
    img = Image.new('RGB', (40, 40), (120, 30, 200))
    for i in range(3000):
        random.seed(i)
        assert tf(img).shape == (3, 32, 32)


def test_epoch_sampler_order_resume_and_partition():
    s = EpochSampler(103, batch_size=8, seed=5, shuffle=True, drop_last=True)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 96 and len(set(full)) == 96  # 12 whole batches, no repeats
    s.set_epoch(2, start_batch=5)
    assert list(s) == full[40:]  # resuming mid-epoch continues the same order
    s.set_epoch(3)
    assert list(s) != full
    ranks = [EpochSampler(103, 8, seed=5, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    parts = [list(r) for r in ranks]
    assert len(parts[0]) == len(parts[1]) == 48 and not set(parts[0]) & set(parts[1])
    ev = [EpochSampler(103, 8, shuffle=False, drop_last=False, rank=r, world_size=2) for r in range(2)]
    assert sorted(list(ev[0]) + list(ev[1])) == list(range(103))  # evaluation sees every image once


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    data = build_datasets('digits', fraction=0.1)
    tf = create_transform(16, is_training=True, scale=(0.5, 1.0), hflip=0.5)
    a, b = SeededTransformDataset(data.train, tf, seed=1), SeededTransformDataset(data.train, tf, seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    for i in (7, 3, 7):  # any access order, any process
        torch.testing.assert_close(a[i][0], b[i][0], rtol=0, atol=0)
    b.set_epoch(5)
    assert not torch.equal(a[7][0], b[7][0])


def test_cluttered_digits_are_the_digits_placed_among_pieces_of_others():
    plain, clutter = build_datasets('digits'), build_datasets('digits_clutter')
    assert (clutter.num_train, clutter.num_val, clutter.default_img_size) == (1347, 450, 32)
    assert clutter.train.targets == plain.train.targets and clutter.val.targets == plain.val.targets  # same split
    for ds, base in ((clutter.train, plain.train), (clutter.val, plain.val)):
        for i in range(0, len(ds), 97):
            img, digit = np.asarray(ds.load(i)[0])[..., 0], np.asarray(base.load(i)[0])[..., 0]
            assert img.shape == (32, 32)
            big = digit.repeat(2, 0).repeat(2, 1)
            # the digit, upsampled, lies whole somewhere on the canvas (clutter only brightens it) ...
            assert any((img[y:y + 16, x:x + 16] >= big).all() for y in range(17) for x in range(17))
            assert (img > 0).sum() > (big > 0).sum()  # ... among clutter
    again = build_datasets('digits_clutter', fraction=0.1, fraction_seed=3)
    index = {t: i for i, t in enumerate(map(bytes, (np.asarray(clutter.train.load(i)[0]) for i in range(1347))))}
    for i in range(len(again.train)):  # a fraction takes a subset of the same images: generated once, fixed
        assert bytes(np.asarray(again.train.load(i)[0])) in index


def test_digits_split_is_fixed_and_fractions_are_stratified():
    full, small = build_datasets('digits'), build_datasets('digits', fraction=0.05, fraction_seed=1)
    assert (full.num_train, full.num_val) == (1347, 450)
    assert small.num_val == 450 and 60 <= small.num_train <= 75
    assert sorted(set(small.train.targets)) == list(range(10))  # every class kept
