"""Whether mirroring keeps an image's class (refiner.mirror), and the hflip derived from it."""
import numpy as np
import pytest

from refiner.data import ArrayDataset
from refiner.defaults import RunSize, derive
from refiner.mirror import measure_mirror


def _bars(kind: str, n_per_class: int = 30, side: int = 24) -> ArrayDataset:
    """Two classes of noisy images with one bright bar: 'side' puts it in the left (class 0) or right
    (class 1) third, which mirroring swaps; 'orientation' makes it horizontal (0) or vertical (1) at a
    random place, which mirroring keeps."""
    rng = np.random.default_rng(0)
    images, targets = [], []
    for c in (0, 1):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, size=(side, side))
            at = int(rng.integers(2, side - 5))
            if kind == 'side':
                col = int(rng.integers(1, side // 3 - 3)) if c == 0 else int(rng.integers(2 * side // 3, side - 4))
                img[2:-2, col:col + 3] = 255
            elif c == 0:
                img[at:at + 3, 2:-2] = 255
            else:
                img[2:-2, at:at + 3] = 255
            images.append(img.astype(np.uint8))
            targets.append(c)
    return ArrayDataset(np.stack(images), np.array(targets), ['a', 'b'])


def _hflip(dataset):
    check = measure_mirror(dataset)
    values, lines = derive(RunSize(num_train=len(dataset), img_size=24, epochs=10, steps_per_epoch=5, mirror=check),
                           ['hflip'])
    return check, values['hflip'], lines[0]


def test_classes_that_mirroring_swaps_turn_flips_off():
    check, hflip, line = _hflip(_bars('side'))
    assert check.images == 60 and check.accuracy == pytest.approx(1.0) and check.mirrored_accuracy < 0.1
    assert hflip == 0.0 and line.startswith('  hflip 0: off: a mirrored image is another class or none (')
    assert 'of 60 sampled images mirrored, 100% unmirrored, chance 50%' in line


def test_classes_that_mirroring_keeps_keep_deits_flips():
    check, hflip, line = _hflip(_bars('orientation'))
    assert check.accuracy > 0.9 and check.kept > 0.9
    assert hflip == 0.5 and line.startswith("  hflip 0.5: DeiT's: mirrored images keep their class (")


def test_no_evidence_keeps_deits_flips():
    """Labels that pixels cannot predict say nothing of mirroring; labels that cannot be listed are not checked."""
    noise = _bars('side')
    noise.targets = list(np.random.default_rng(1).permutation(noise.targets))
    check, hflip, line = _hflip(noise)
    assert check.accuracy - check.chance < 0.1
    assert hflip == 0.5 and "DeiT's: nearest neighbours on pixels tell nothing of mirroring here" in line

    class Unlisted:
        targets = None
    assert measure_mirror(Unlisted()) is None
    values, lines = derive(RunSize(10, 24, 1, 1), ['hflip'])
    assert values['hflip'] == 0.5 and 'mirroring not checked' in lines[0]


def test_unreadable_images_are_left_out_of_the_sample():
    dataset = _bars('side', n_per_class=10)
    load = dataset.load
    dataset.load = lambda i: (None, dataset.targets[i], f'#{i}') if i % 2 else load(i)
    assert measure_mirror(dataset).images == 10
