"""What a --data value names, read once for the datasets and the recipe a run starts from."""
from refiner.config import default_recipe
from refiner.data_specs import DataSpec, parse_data_spec


def test_names_and_specs():
    assert parse_data_spec(None) == parse_data_spec('') == DataSpec('digits', 'digits', None)
    assert parse_data_spec('digits_clutter').kind == 'digits_clutter'
    assert parse_data_spec('fashion_mnist') == DataSpec('fashion_mnist', 'fashion_mnist', None)
    assert parse_data_spec('fashion_mnist:/data/fm') == DataSpec('fashion_mnist', 'fashion_mnist', '/data/fm')
    assert parse_data_spec('torch/cifar10:/data/c10') == DataSpec('timm', 'torch/cifar10', '/data/c10')
    assert parse_data_spec('hfds/beans') == DataSpec('timm', 'hfds/beans', None)
    assert parse_data_spec('data/mine') == DataSpec('folder', 'data/mine', None)
    assert parse_data_spec('fashion_mnist_small').kind == 'folder'


def test_an_existing_folder_wins_over_a_name_but_not_over_the_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ('fashion_mnist', 'torch/cifar10', 'digits'):
        (tmp_path / name).mkdir(parents=True)
    assert parse_data_spec('fashion_mnist') == DataSpec('folder', 'fashion_mnist', None)
    assert parse_data_spec('torch/cifar10').kind == 'folder'
    assert parse_data_spec('digits').kind == 'digits'  # embedded: exists only inside the package


def test_the_recipe_follows_the_same_reading(tmp_path, monkeypatch):
    assert [default_recipe(d) for d in (None, '', 'digits', 'digits_clutter', 'fashion_mnist:/x', 'torch/mnist')] \
        == ['default', 'default', 'default', 'digits_clutter', 'fashion_mnist', None]
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'fashion_mnist').mkdir()
    assert default_recipe('fashion_mnist') is None  # a folder of the user's: TrainConfig's defaults
