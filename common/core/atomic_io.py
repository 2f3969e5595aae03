"""Atomic writes: a reader (or a resume after a kill) sees the old content or the new, never a partial file.

Every writer here builds the new content under a temporary name in the destination's own folder (so that the
final :func:`os.replace` is a rename within one file system) and renames it over the destination only once it is
complete and fsynced; whatever fails on the way removes the temporary and leaves the destination as it was.

Temporary names are hidden and recognisable, so that a store can count what a kill left behind:

- files: ``.<name>.<random>.tmp`` beside ``<name>`` (:func:`write_bytes_atomic`, :func:`write_text_atomic`,
  :func:`write_json_atomic`, :func:`atomic_path`, :func:`create_exclusive`);
- folders: ``.<name>.<random>.tmp`` while built, and ``.<name>.old-<pid>`` for the replaced folder during the
  swap (:func:`atomic_dir`).

Permissions: a temporary file is created 0600 (:func:`tempfile.mkstemp`) and keeps that mode unless ``mode`` is
given (applied as is, not filtered by the umask); a temporary folder is 0700 (:func:`tempfile.mkdtemp`).
The parent folder of the destination is created when missing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

TEMP_SUFFIX = ".tmp"


def write_bytes_atomic(path: Path | str, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically: temp file beside it, write, flush, fsync, :func:`os.replace`.

    Parameters
    ----------
    path: the destination; an existing file is replaced.
    data: the new content.
    mode: permission bits of the result (e.g. ``0o644``); ``None`` keeps the temp file's 0600.

    Returns
    -------
    ``path``.
    """
    path = Path(path)
    tmp = _written_temp(path, data)
    try:
        _commit(tmp, path, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path | str, text: str, *, mode: int | None = None, encoding: str = "utf-8") -> Path:
    """:func:`write_bytes_atomic` of ``text`` encoded with ``encoding``."""
    return write_bytes_atomic(path, text.encode(encoding), mode=mode)


def write_json_atomic(path: Path | str, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      default: Callable[[Any], Any] | None = str, mode: int | None = None) -> Path:
    """Write ``obj`` as JSON (no trailing newline) atomically; see :func:`write_bytes_atomic`.

    ``default`` is :func:`json.dumps`'s: by default a value JSON cannot encode is written as ``str(value)`` (the
    convention of the run's records); pass ``default=None`` for strict JSON. The object is serialised before any
    file is touched, so a ``TypeError`` leaves the destination (and its folder) as it was.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)
    return write_text_atomic(path, text, mode=mode)


@contextmanager
def atomic_path(path: Path | str, *, mode: int | None = None) -> Iterator[Path]:
    """For writers that open the file themselves (``safetensors.save_file``, PIL ``Image.save``).

    Yields a temporary path beside ``path`` (an empty file that exists already: the writer overwrites it); when the
    block ends without an exception the file is fsynced, given ``mode`` (``None`` keeps 0600) and renamed over
    ``path``. On an exception the temporary is removed and ``path`` is untouched::

        with atomic_path(folder / "weights.safetensors") as tmp:
            save_file(tensors, str(tmp))
    """
    path = Path(path)
    tmp = _temp_file(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        _commit(tmp, path, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(folder: Path | str) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``folder`` and swap it in when the block succeeds.

    Yields the empty temporary folder (mode 0700). On success, an existing ``folder`` is moved aside
    (``.<name>.old-<pid>``), the new one is renamed to ``folder`` and only then is the old one deleted; if that
    rename fails the old folder is moved back. On an exception inside the block the temporary folder is deleted
    and ``folder`` (whether it existed or not) is untouched. A reader may find ``folder`` missing for the instant
    between the two renames, never half-written.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=TEMP_SUFFIX, dir=folder.parent))
    try:
        yield tmp
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def create_exclusive(path: Path | str, data: bytes, *, mode: int = 0o600) -> bool:
    """Write ``data`` to ``path`` complete, but only if no file is there; whether this call wrote it.

    The content is written and fsynced under a temporary name, then hard-linked to ``path`` (:func:`os.link`:
    atomic, and it never overwrites), so of two concurrent first uses exactly one wins and both then read the
    same content. Needs a file system with hard links.
    """
    path = Path(path)
    tmp = _written_temp(path, data)
    try:
        os.chmod(tmp, mode)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _temp_file(path: Path) -> Path:
    """A new empty ``.<name>.<random>.tmp`` (mode 0600) beside ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    return Path(name)


def _written_temp(path: Path, data: bytes) -> Path:
    """A temp file beside ``path`` holding ``data``, fsynced; removed again if writing fails."""
    tmp = _temp_file(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _commit(tmp: Path, path: Path, mode: int | None) -> None:
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``, keeping an existing ``folder`` aside until that succeeded."""
    old = None
    if folder.exists() or folder.is_symlink():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        _remove(old)  # left by an earlier kill of a process with this pid
        os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        if old is not None:
            os.replace(old, folder)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
