"""refiner.fileio: files written atomically keep the umask's permissions; output paths are checked."""
import os
import stat

import pytest

import refiner  # noqa: F401  (registers the models)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize('umask', [0o022, 0o002])
def test_written_files_keep_the_umask_permissions(tmp_path, umask, nano_checkpoint):
    """A first-hour trap (issue 22): tempfile (and safetensors' writer) make files 0600 and folders 0700,
    so checkpoints and exported Hub folders came out private whatever the umask; what is renamed into
    place must get the mode open() / mkdir would have given."""
    from refiner.export import export_hf
    from refiner.fileio import atomic_write_text
    from refiner.pretrained import load_model
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / 'a.txt', 'x')
        (tmp_path / 'b.txt').write_text('x')  # what open() gives
        (tmp_path / 'plain').mkdir()
        model, info = load_model(nano_checkpoint[0])
        out = export_hf(model, str(tmp_path / 'hub'), info)
    finally:
        os.umask(old)
    assert _mode(tmp_path / 'a.txt') == _mode(tmp_path / 'b.txt') == 0o666 & ~umask
    assert _mode(out) == _mode(tmp_path / 'plain') == 0o777 & ~umask
    assert _mode(out / 'model.safetensors') == _mode(out / 'config.json') == 0o666 & ~umask


def test_output_problem_says_why_a_path_cannot_be_written(tmp_path):
    from refiner.fileio import output_problem
    a_file, a_folder = tmp_path / 'f.txt', tmp_path / 'd'
    a_file.write_text('x')
    a_folder.mkdir()
    # writable: new or existing, at any depth under a folder
    for path, kind in [(a_folder, 'folder'), (a_folder / 'new' / 'deep', 'folder'), (a_file, 'file'),
                       (a_folder / 'new' / 'm.json', 'file'), (a_file, 'any'), (a_folder, 'any')]:
        assert output_problem(path, kind) is None, (path, kind)
    assert output_problem(a_file, 'folder') == f'{a_file} is a file; expected a folder'
    assert output_problem(a_folder, 'file') == f'{a_folder} is a folder; expected a file name'
    assert output_problem(a_file / 'sub' / 'm.json', 'file') == (
        f'{a_file} is a file, so {a_file / "sub" / "m.json"} cannot be created inside it')
    assert output_problem('', 'folder') == 'an empty path'
    with pytest.raises(ValueError):
        output_problem(a_folder, 'directory')


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() == 0, reason='root may write anywhere')
def test_output_problem_refuses_a_folder_without_write_permission(tmp_path):
    from refiner.fileio import output_problem
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o555)
    assert output_problem(locked / 'run', 'folder') == f'{locked} is not writable'
