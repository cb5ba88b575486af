"""What a --data value names, read once for the datasets and the recipe a run starts from."""
import pytest

from refiner.config import ConfigError, default_recipe, load_recipe
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


def test_a_name_wins_over_a_folder_called_so_which_is_written_with_its_path(tmp_path, monkeypatch):
    """A user who unpacks the IDX files into ./fashion_mnist still gets Fashion-MNIST and its recipe."""
    monkeypatch.chdir(tmp_path)
    for name in ('fashion_mnist', 'torch/cifar10', 'digits', 'default'):
        (tmp_path / name).mkdir(parents=True)
    assert parse_data_spec('fashion_mnist') == DataSpec('fashion_mnist', 'fashion_mnist', None)
    assert parse_data_spec('torch/cifar10').kind == 'timm'
    assert parse_data_spec('digits').kind == 'digits'
    assert parse_data_spec('./fashion_mnist') == DataSpec('folder', './fashion_mnist', None)
    assert parse_data_spec('./torch/cifar10').kind == 'folder'
    # the recipes likewise: a shipped name is not hidden by a folder of that name
    assert load_recipe('fashion_mnist_long')['epochs'] == 15 and 'epochs' in load_recipe('default')
    with pytest.raises(ConfigError, match='no such file'):
        load_recipe('./fashion_mnist')


def test_the_recipe_follows_the_same_reading():
    assert [default_recipe(d) for d in (None, '', 'digits', 'digits_clutter', 'fashion_mnist:/x', 'torch/mnist')] \
        == ['default', 'default', 'default', 'digits_clutter', 'fashion_mnist', None]
    assert default_recipe('./fashion_mnist') is None  # a folder of the user's: TrainConfig's defaults
