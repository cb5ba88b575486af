"""Fashion-MNIST from its IDX files, and timm's torch/... dataset specs: tiny IDX files written here
(the Debian package is never needed), read in every layout, held out on the official test split, and
trained, evaluated, predicted, analysed and ablated from the command line."""
import json

import numpy as np
import pytest
from conftest import N_TEST, N_TRAIN, _idx, fashion_mnist_images, write_fashion_mnist
from PIL import Image

from refiner import fashion_mnist
from refiner.cli import main
from refiner.data import DataError, build_datasets


@pytest.fixture(scope='module')
def fmnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('fmnist')
    write_fashion_mnist(root)
    return root


@pytest.mark.parametrize('layout', ['plain', 'gzip', 'torchvision'])
def test_fashion_mnist_reads_every_layout_and_holds_out_the_test_files(tmp_path, layout):
    folder = tmp_path / 'FashionMNIST' / 'raw' if layout == 'torchvision' else tmp_path
    train_labels, test_labels = write_fashion_mnist(folder, gz=layout == 'gzip')
    ds = build_datasets(f'fashion_mnist:{tmp_path}')
    assert ds.classes == ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                          'Bag', 'Ankle boot']
    assert (ds.num_train, ds.num_val, ds.default_img_size) == (N_TRAIN, N_TEST, 28)
    assert ds.train.targets == train_labels.tolist() and ds.val.targets == test_labels.tolist()
    test_images = fashion_mnist_images(N_TEST, 1)[0]
    img, target, _ = ds.val.load(3)
    assert np.array_equal(np.asarray(img)[..., 0], test_images[3]) and target == test_labels[3]


def test_fashion_mnist_fraction_and_classes(fmnist_dir):
    ds = build_datasets(f'fashion_mnist:{fmnist_dir}', fraction=0.5, fraction_seed=0, classes=['Bag', 'Sandal'])
    assert ds.classes == ['Bag', 'Sandal']
    assert sorted(ds.train.targets) == [0, 0, 0, 1, 1, 1] and sorted(ds.val.targets) == [0, 0, 1, 1]
    assert ds.train.images[[t == 0 for t in ds.train.targets]][:, 2 + 2 * 8].min() == 250  # Bag is class 8
    full = build_datasets(f'fashion_mnist:{fmnist_dir}', fraction=0.5, fraction_seed=1)
    assert full.num_train == N_TRAIN // 2 and full.num_val == N_TEST
    with pytest.raises(DataError, match='classes .*Fashion-MNIST'):
        build_datasets(f'fashion_mnist:{fmnist_dir}', classes=['Bag', 'Hat'])


def test_missing_or_broken_fashion_mnist_files_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, 'DEBIAN_DIR', tmp_path / 'absent')
    with pytest.raises(DataError, match=r'^Fashion-MNIST is not installed: `apt-get install dataset-fashion-mnist`'):
        build_datasets('fashion_mnist')
    with pytest.raises(DataError, match=r'train-images-idx3-ubyte\[\.gz\].*/FashionMNIST/raw'):
        build_datasets(f'fashion_mnist:{tmp_path}')
    write_fashion_mnist(tmp_path, gz=False)
    path = tmp_path / 'train-images-idx3-ubyte'
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match='truncated'):
        build_datasets(f'fashion_mnist:{tmp_path}')
    path.write_bytes(b'not an idx file at all')
    with pytest.raises(DataError, match='not an IDX file'):
        build_datasets(f'fashion_mnist:{tmp_path}')
    path.write_bytes(b'\x00\x00\x08\x03\x00\x00\x00\x05')  # a header cut after one of three sizes
    with pytest.raises(DataError, match='header of 3 dimensions needs 16 bytes'):
        build_datasets(f'fashion_mnist:{tmp_path}')
    write_fashion_mnist(tmp_path, gz=False)  # whole again, then test images of another size
    (tmp_path / 't10k-images-idx3-ubyte').write_bytes(_idx(np.zeros((N_TEST, 27, 27), np.uint8)))
    with pytest.raises(DataError, match='training images are 28x28 pixels, the test images 27x27'):
        build_datasets(f'fashion_mnist:{tmp_path}')
    write_fashion_mnist(tmp_path, gz=False)
    corrupt = tmp_path / 'corrupt'
    write_fashion_mnist(corrupt)
    gz = corrupt / 'train-labels-idx1-ubyte.gz'
    body = bytearray(gz.read_bytes())
    body[12:20] = b'\xff' * 8  # a corrupt deflate stream behind a valid gzip header
    gz.write_bytes(bytes(body))
    with pytest.raises(DataError, match='could not be read'):
        build_datasets(f'fashion_mnist:{corrupt}')
    monkeypatch.setattr(fashion_mnist, 'DEBIAN_DIR', tmp_path)  # the package's location is the default
    write_fashion_mnist(tmp_path)
    path.unlink()  # the .gz files remain
    assert build_datasets('fashion_mnist').num_train == N_TRAIN


def test_torch_specs_carry_class_names_and_apply_fraction_and_classes(tmp_path):
    """torchvision's FashionMNIST through timm's factory (torch/fashion_mnist:DIR) names its classes and
    draws the same fraction and class subset as fashion_mnist:DIR."""
    folder = tmp_path / 'FashionMNIST' / 'raw'
    write_fashion_mnist(folder, gz=False)
    ds = build_datasets(f'torch/fashion_mnist:{tmp_path}')
    assert ds.classes == fashion_mnist.CLASSES and (ds.num_train, ds.num_val) == (N_TRAIN, N_TEST)
    sub = build_datasets(f'torch/fashion_mnist:{tmp_path}', fraction=0.5, fraction_seed=3, classes=['Coat', 'Bag'])
    ours = build_datasets(f'fashion_mnist:{tmp_path}', fraction=0.5, fraction_seed=3, classes=['Coat', 'Bag'])
    assert sub.classes == ['Coat', 'Bag'] and sub.train.targets == ours.train.targets
    assert sub.num_train == 6 and sub.num_val == 4 and sorted(sub.val.targets) == [0, 0, 1, 1]
    for i in range(sub.num_train):
        img, target, _ = sub.train.load(i)
        assert np.array_equal(np.asarray(img), np.asarray(ours.train.load(i)[0])) and target == ours.train.targets[i]


def test_a_spec_that_cannot_list_its_labels_refuses_a_fraction(monkeypatch):
    import timm.data

    class Unlisted:  # a dataset that can be indexed but lists no targets
        reader = None
        classes = ['a', 'b']

        def __len__(self):
            return 4

    monkeypatch.setattr(timm.data, 'create_dataset', lambda *a, **k: Unlisted())
    assert build_datasets('hfds/some-set').classes == ['a', 'b']
    with pytest.raises(DataError, match=r'^--train-fraction: timm dataset hfds/some-set does not list its labels'):
        build_datasets('hfds/some-set', fraction=0.5)
    with pytest.raises(DataError, match=r'^--classes: '):
        build_datasets('hfds/some-set', classes=['a', 'b'])
    for streamed in ('tfds/mnist', 'hfids/user/set', 'wds/some-shards'):  # refused before timm is asked
        with pytest.raises(DataError, match=rf'^--data {streamed}: timm streams .* use hfds/'):
            build_datasets(streamed)


def test_fashion_mnist_end_to_end_on_the_command_line(fmnist_dir, tmp_path, capsys):
    """train (the fashion_mnist recipe, picked by default), eval, predict, analyze cka and ablate on a run
    trained on tiny Fashion-MNIST files."""
    data = f'fashion_mnist:{fmnist_dir}'
    run = tmp_path / 'run'
    common = ['--epochs', '1', '--batch-size', '10', '--no-progress']
    assert main(['train', '--data', data, '--out', str(run), *common]) == 0
    out = capsys.readouterr().out
    assert 'on Fashion-MNIST: 60 train / 20 test images, 28x28 grey' in out
    assert 'defaults derived' not in out  # the shipped recipe, not derived values
    config = (run / 'config.yaml').read_text()
    assert 'img_size: 28' in config and 'data: fashion_mnist:' in config
    assert json.loads((run / 'summary.json').read_text())['num_val'] == N_TEST

    assert main(['eval', '--checkpoint', str(run), '--no-progress', '--json', str(tmp_path / 'eval.json')]) == 0
    report = json.loads((tmp_path / 'eval.json').read_text())
    assert report['classes'][0] == 'T-shirt/top' and report['n'] == N_TEST

    Image.fromarray(fashion_mnist_images(1, 5)[0][0]).save(tmp_path / 'shirt.png')
    assert main(['predict', str(tmp_path / 'shirt.png'), '--checkpoint', str(run), '--topk', '2']) == 0
    assert any(name in capsys.readouterr().out for name in fashion_mnist.CLASSES)

    # with no --data, the run's own dataset (as eval does), not the digits
    assert main(['analyze', 'cka', '--checkpoint', str(run), '--max-images', '16',
                 '--batch-size', '8', '--out', str(tmp_path / 'cka'), '--no-progress']) == 0
    assert json.loads((tmp_path / 'cka' / 'cka.json').read_text())['data'] == data

    assert main(['ablate', '--data', data, '--models', 'refiner', '--fractions', '1.0', '--seeds', '0',
                 '--epochs', '1', '--set', 'batch_size=10', '--out', str(tmp_path / 'abl'), '--no-progress']) == 0
    result = json.loads((tmp_path / 'abl' / 'ablation.json').read_text())
    assert json.dumps(result).count('fashion_mnist') >= 1


def test_fashion_mnist_studies_resolve_to_the_fashion_mnist_recipe():
    from refiner.ablate import arm_configs
    for study in ('fmnist_efficiency', 'fmnist_components'):
        for name, cfg in arm_configs(study=study).items():
            assert (cfg.data, cfg.img_size, cfg.epochs, cfg.hflip) == ('fashion_mnist', 28, 3, 0.5), (study, name)
