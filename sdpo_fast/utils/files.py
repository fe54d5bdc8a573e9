"""Atomic writes: a file or directory appears whole under its final name, or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str, *, mode: int | None = None, fsync: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` through a temporary file in the same directory, then os.replace.

    mode: the file's permission bits (default: mkstemp's 0o600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_dir(final: str | os.PathLike, write: Callable[[Path], None], *, tag: str = "tmp") -> Path:
    """Build a directory with `write(tmp_dir)` beside `final`, fsync its files, then swap it in for `final`.

    An existing `final` is renamed aside first (`.NAME.old<pid>`) and removed after the swap, so a crash leaves
    either the old or the new directory (plus an aside that `recover_dirs` puts back or removes).
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}.{tag}{os.getpid()}"
    old = final.parent / f".{final.name}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        for path in tmp.iterdir():
            if path.is_file():
                fsync_file(path)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
