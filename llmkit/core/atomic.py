"""The one way llmkit writes a file that must never be seen half-written.

A file is written to a temporary sibling (``NAME.tmpPID``: the PID keeps two processes that write
the same file from sharing a temporary), flushed to disk with fsync, then renamed over its name,
and the directory fsynced so the rename itself survives a crash. A reader sees the old file or the
new one, never a torn mix; a crash leaves at most a ``.tmpPID`` sibling, never a damaged target.
Directories (checkpoints, caches) are built the same way under a temporary name by their owners,
who call ``fsync_dir`` and ``commit`` from here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (a rename into it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@functools.lru_cache(maxsize=1)
def file_mode() -> int:
    """The mode a new file gets here (0644 under the usual umask 022): what every file llmkit
    writes gets, whatever the library that wrote it chose (safetensors writes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success its files get ``file_mode``, are fsynced, and
    the folder is renamed to ``path`` (an empty folder there is replaced); on failure it is removed.
    A killed or failed writer leaves no half-made folder under the final name."""
    path = Path(path)
    tmp = temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, file_mode())
                fsync_file(f)
        fsync_dir(tmp)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def temp_sibling(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def commit(tmp: Path, path: Path) -> None:
    """A finished temporary file, durably, under its final name."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through (for writers that take a path, such as
    safetensors' ``save_file``); on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
