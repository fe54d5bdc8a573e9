"""Atomic writes: a file or directory appears whole under its final name, or not at all.

Disk errors (ENOSPC, EDQUOT, EROFS, EACCES, EPERM) while writing become `DiskError` (a ValueError) with one line
naming the path, after the partial temporary file or directory has been removed."""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# How a full disk shows up when a writer in C/C++/Rust (torch.save, safetensors) swallows the errno.
_DISK_FULL_TEXT = re.compile(r"No space left|os error 28|Disk quota|unexpected pos|file write failed", re.I)


class DiskError(ValueError):
    """A write failed because the disk is full, read-only, or the path is not writable."""


def disk_error(exc: BaseException, path: str | os.PathLike) -> DiskError | None:
    """The one-line DiskError `exc` amounts to when writing `path`, or None when it is no disk error. The errno
    is looked up along the exception's cause/context chain (torch.save wraps the OSError in a RuntimeError)."""
    code, seen = None, exc
    while seen is not None and code is None:
        code, seen = getattr(seen, "errno", None), seen.__cause__ or seen.__context__
    if code in (errno.ENOSPC, errno.EDQUOT):
        return DiskError(f"disk full at {str(path)!r}: free space (or lower --save-total-limit) and rerun")
    if code == errno.EROFS:
        return DiskError(f"cannot write {str(path)!r}: read-only file system; choose another --output-dir")
    if code in (errno.EACCES, errno.EPERM):
        return DiskError(f"cannot write {str(path)!r}: permission denied; choose another --output-dir")
    if isinstance(exc, (RuntimeError, OSError)) and _DISK_FULL_TEXT.search(str(exc)):
        return DiskError(f"disk full (write failed) at {str(path)!r}: free space and rerun")
    return None


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str, *, mode: int | None = None, fsync: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` through a temporary file in the same directory, then os.replace.

    mode: the file's permission bits (default: mkstemp's 0o600). A missing parent directory is a
    FileNotFoundError naming `path`; a disk error a DiskError naming `path`.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory; give a file path", str(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "its directory does not exist", str(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise (disk_error(exc, path) or exc) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        mapped = disk_error(exc, path)
        if mapped is not None:
            raise mapped from None
        raise
    return path


def replace_dir(final: str | os.PathLike, write: Callable[[Path], None], *, tag: str = "tmp",
                mode: int | None = 0o700) -> Path:
    """Build a directory with `write(tmp_dir)` beside `final`, fsync its files, then swap it in for `final`.

    An existing `final` is renamed aside first (`.NAME.old<pid>`) and removed after the swap, so a crash leaves
    either the old or the new directory (plus an aside that `recover_dirs` puts back or removes). A disk error
    (also one a C/Rust writer reports without errno) is a DiskError naming `final`; nothing is left half-written.
    mode: permission bits of the new directory (default 0o700: owner only).
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}.{tag}{os.getpid()}"
    old = final.parent / f".{final.name}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        if mode is not None:
            os.chmod(tmp, mode)
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_file(path)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError) as exc:
        mapped = disk_error(exc, final)
        if mapped is not None:
            raise mapped from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
