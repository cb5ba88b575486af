"""refiner predict: image files and folders classified, what it skipped or ignored named, class names."""
import json

import pytest
import torch
from PIL import Image

import refiner  # noqa: F401  (registers the models)
from refiner.cli import main
from refiner.pretrained import load_model


def _image_folder(tmp_path):
    from sklearn.datasets import load_digits
    digits = load_digits()
    folder = tmp_path / 'images' / 'nested'
    folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray((digits.images[i] * 15).astype('uint8')).save(folder / f'{i}_{digits.target[i]}.png')
    (folder / 'broken.png').write_bytes(b'not an image at all')
    (folder / 'notes.txt').write_text('ignored: not an image extension')
    return tmp_path / 'images'


def test_predict_a_folder_with_a_bad_file(pretrained_run, tmp_path, capsys):
    images = _image_folder(tmp_path)
    code = main(['predict', str(images), '--checkpoint', str(pretrained_run), '--topk', '3',
                 '--json', str(tmp_path / 'p.json'), '--csv', str(tmp_path / 'p.csv'), '--no-progress'])
    assert code == 0
    assert '6 image(s) classified' in capsys.readouterr().out
    res = json.loads((tmp_path / 'p.json').read_text())
    assert res['skipped'] == [str(images / 'nested' / 'broken.png')] and len(res['predictions']) == 6
    assert res['classes'] == ['0', '1', '2', '3', '4']
    # the same numbers as the model on the run's eval transform
    model, info = load_model(pretrained_run)
    tf = refiner.data.eval_transform(info['data_config'])
    first = res['predictions'][0]
    x = tf(refiner.data.load_rgb(first['file']))[None]
    probs = model(x).softmax(-1)[0]
    assert first['indices'] == probs.topk(3).indices.tolist()
    assert first['probs'] == pytest.approx(probs.topk(3).values.tolist(), rel=1e-5)
    rows = (tmp_path / 'p.csv').read_text().splitlines()
    assert rows[0] == 'file,label1,prob1,label2,prob2,label3,prob3' and len(rows) == 7


def test_predict_names_imagenet_classes_for_a_1000_class_model():
    from refiner.predict import class_names
    names = class_names(1000, None)
    assert len(names) == 1000 and names[0].startswith('tench')


def _random_image(path):
    from PIL import Image
    Image.fromarray(torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy()).save(path)


def test_predict_names_what_it_skipped_and_ignored_and_fails_on_nothing(tmp_path, nano_checkpoint, capsys):
    """A first-hour trap (issue 22): predict on a folder must say which files it skipped or ignored,
    and exit 1 with a sentence when nothing could be classified."""
    folder = tmp_path / 'photos'
    folder.mkdir()
    _random_image(folder / 'good.png')
    (folder / 'broken.png').write_bytes(b'not an image')
    (folder / 'notes.txt').write_text('not an image either')
    ckpt = str(nano_checkpoint[0])
    assert main(['predict', str(folder), '--checkpoint', ckpt, '--no-progress']) == 0
    out = capsys.readouterr().out
    assert f'skipped {folder / "broken.png"}: not a readable image' in out
    assert f'1 image(s) classified with refiner_vit_nano; 1 unreadable file(s) skipped; 1 non-image file(s) ' \
           f'({folder / "notes.txt"}) ignored' in out
    # nothing classified: exit 1, saying why
    (folder / 'good.png').unlink()
    argv = ['predict', str(folder), '--checkpoint', ckpt, '--no-progress', '--json', str(tmp_path / 'p.json')]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert f'skipped {folder / "broken.png"}' in captured.out
    assert 'none of the 1 file(s) could be read as an image' in captured.err
    assert json.loads((tmp_path / 'p.json').read_text())['ignored'] == [str(folder / 'notes.txt')]
    (folder / 'broken.png').unlink()
    assert main(['predict', str(folder), '--checkpoint', ckpt, '--no-progress']) == 1
    assert f'1 non-image file(s) ({folder / "notes.txt"}) ignored' in capsys.readouterr().err


def test_predict_names_every_one_of_five_ignored_files_and_counts_the_rest(tmp_path, nano_checkpoint, capsys):
    """Up to five ignored files are all named; a sixth is counted, not named."""
    folder = tmp_path / 'photos'
    folder.mkdir()
    _random_image(folder / 'good.png')
    notes = [folder / f'note{i}.txt' for i in range(5)]
    for note in notes:
        note.write_text('not an image')
    assert main(['predict', str(folder), '--checkpoint', str(nano_checkpoint[0]), '--no-progress']) == 0
    out = capsys.readouterr().out
    assert f'5 non-image file(s) ({", ".join(map(str, notes))}) ignored' in out and 'more' not in out
    (folder / 'note5.txt').write_text('not an image')
    assert main(['predict', str(folder), '--checkpoint', str(nano_checkpoint[0]), '--no-progress']) == 0
    assert f'6 non-image file(s) ({", ".join(map(str, notes))}, ... 1 more) ignored' in capsys.readouterr().out


def test_an_empty_input_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    from refiner.data import DataError
    from refiner.predict import find_images
    monkeypatch.chdir(tmp_path)
    Image.new('RGB', (8, 8)).save(tmp_path / 'here.png')
    assert find_images(['.']) == ['./here.png']
    with pytest.raises(DataError, match='an empty input path'):
        find_images([''])
