"""Writing files so that a failure never leaves a partial one: a temporary file in the same
folder, fsync, then an atomic rename over the target, then fsync of the folder."""
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

__all__ = ['atomic_write', 'atomic_write_text']


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``; on any failure the old file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            f.write(text)
    return atomic_write(path, write)
