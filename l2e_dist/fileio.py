"""Atomic, durable file writes: the one place every output of the project is written through.

A reader (a resuming job, an evaluation script, a second rank) must never see half a file, and a crash or a
full disk must leave the previous version in place. So every writer goes to a temporary file in the same
directory (same file system, so the rename is atomic), fsyncs it, renames it over the target and fsyncs the
directory (a rename is durable only once its directory is). A failed write removes its temporary file.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _umask() -> int:
    """The process umask, read once: reading it means setting it, which must not race other threads' writes."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], *, durable: bool = True) -> Path:
    """Call `write(tmp)` on a fresh temporary path beside `path`, then rename it over `path`.

    The temporary name keeps `path`'s suffix, so writers that pick a format from the name (np.save,
    savefig) behave as they would on `path`. `durable=False` skips the fsyncs (for scratch outputs).
    """
    path = Path(path)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=path.suffix)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        write(tmp)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=durable)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), durable=durable)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1, sort_keys: bool = True,
                      durable: bool = True, default: Callable[[Any], Any] | None = None) -> Path:
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n"
    return atomic_write_text(path, text, durable=durable)


def atomic_save_npy(path: str | os.PathLike, array: Any, *, durable: bool = True) -> Path:
    import numpy as np

    return atomic_write(path, lambda tmp: np.save(tmp, array), durable=durable)
