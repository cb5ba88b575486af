"""refiner.fileio: files written atomically keep the umask's permissions."""
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
