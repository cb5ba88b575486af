"""Writing files so that a failure never leaves a partial one: a temporary file in the same
folder, fsync, then an atomic rename over the target, then fsync of the folder. A process killed
outright (SIGKILL) runs no cleanup and leaves its temporary behind: :func:`remove_temporaries`.

What is renamed into place gets the permissions that ``open()`` / ``mkdir`` would give under the
current umask: ``tempfile`` (and safetensors' own writer) make files private, 0600 / 0700.

:func:`exclusive_lock`: one process at a time, with no stale lock after a kill. A folder written
whole and renamed into place (:func:`held_temp_dir`) is locked by its writer while it is filled, so
that :func:`remove_abandoned_temp_dirs` removes only those a killed writer left.

:func:`output_problem`: why an output path cannot be written (a file where a folder is wanted, a folder
under a file, a folder without write permission), for the command line to refuse it before any work."""
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ['apply_umask', 'atomic_write', 'atomic_write_text', 'exclusive_lock', 'make_temp_dir',
           'remove_temporaries', 'held_temp_dir', 'remove_abandoned_temp_dirs', 'output_problem']

_TMP_PREFIX, _TMP_SUFFIX = '.', '.tmp'  # a temporary is '.NAME.RANDOM.tmp' beside NAME


def _umask() -> int:
    """The process umask (read without a window where it is changed, where Linux reports it)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Union[str, os.PathLike]) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions that ``open()`` / ``mkdir``
    give new files and folders under the current umask."""
    mask = _umask()
    path = Path(path)
    for p in [path, *(path.rglob('*') if path.is_dir() else ())]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def make_temp_dir(parent: Union[str, os.PathLike], name: str) -> Path:
    """A new hidden folder in ``parent``, to be filled, given :func:`apply_umask` and renamed into place as ``name``."""
    return Path(tempfile.mkdtemp(prefix=f'.{name}.', dir=parent))


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
    fd, tmp = tempfile.mkstemp(prefix=f'{_TMP_PREFIX}{path.name}.', suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        apply_umask(tmp)  # as open(path, 'w') would have created it
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


def remove_temporaries(folder: Union[str, os.PathLike]) -> int:
    """Remove the temporaries that killed writers left in ``folder``; only while nothing else writes
    there (hold :func:`exclusive_lock`). Returns how many were removed."""
    removed = 0
    for path in Path(folder).glob(f'{_TMP_PREFIX}*{_TMP_SUFFIX}'):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


@contextmanager
def exclusive_lock(path: Union[str, os.PathLike], wait: bool = False) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block; yields whether
    this process holds it: without ``wait``, False when another one does (and nothing is held).
    The system releases the lock when its holder ends, however it ends, so a kill never leaves a
    stale one. Where there is no ``flock`` (Windows) nothing is locked and it yields True."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is None:
            yield True
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True  # closing the file releases the lock
    finally:
        os.close(fd)


@contextmanager
def held_temp_dir(parent: Union[str, os.PathLike], name: str) -> Iterator[Path]:
    """:func:`make_temp_dir`, locked (``flock`` on the folder itself, no file added) until the block
    ends, renamed into place or not: :func:`remove_abandoned_temp_dirs` leaves it alone meanwhile."""
    path = make_temp_dir(parent, name)
    fd = os.open(path, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)


def remove_abandoned_temp_dirs(parent: Union[str, os.PathLike], name: str) -> int:
    """Remove the temporary folders for ``name`` in ``parent`` that killed writers left (those that no
    live process holds, see :func:`held_temp_dir`); nothing where there is no ``flock``. Returns how many."""
    if fcntl is None:
        return 0
    removed = 0
    for path in Path(parent).glob(f'.{name}.*'):
        if not path.is_dir() or path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # being written
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def output_problem(path: Union[str, os.PathLike], kind: str) -> Optional[str]:
    """Why ``path`` cannot be written as an output of ``kind`` ('folder', 'file', or 'any' for either), or
    None: it exists as the other kind, or the folder it would be created in is a file or is not writable."""
    if kind not in ('folder', 'file', 'any'):
        raise ValueError(f"kind must be 'folder', 'file' or 'any', not {kind!r}")
    if not str(path):
        return 'an empty path'
    path = Path(path)
    if path.exists():
        if kind == 'folder' and not path.is_dir():
            return f'{path} is a file; expected a folder'
        if kind == 'file' and path.is_dir():
            return f'{path} is a folder; expected a file name'
    # where the output is created: the folder itself if it exists, else the nearest existing folder above
    start = path if kind == 'folder' and path.is_dir() else path.parent
    where = next((p for p in (start, *start.parents) if p.exists()), Path('.'))
    if not where.is_dir():
        return f'{where} is a file, so {path} cannot be created inside it'
    if not os.access(where, os.W_OK | os.X_OK):
        return f'{where} is not writable'
    return None

