"""Streaming row readers: JSONL, JSON (one list, or JSON lines), Parquet, local `datasets`
directories, directories of such files, and Hugging Face Hub dataset ids (online only).

Each reader yields (file, number, row) where number is 1-based (the line for JSONL, the element
index for JSON lists and Parquet/datasets rows) and row is a parsed object or an InvalidRow.
Memory: JSONL is read line by line, Parquet by record batches, `datasets` directories through
memory-mapped Arrow batches, and a JSON list with json.JSONDecoder.raw_decode over a sliding
buffer that holds about one element (reads grow only while an element is incomplete, up to
MAX_JSON_ELEMENT_CHARS).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from ..utils.hub import hub_endpoint, hub_unreachable

MAX_JSON_ELEMENT_CHARS = 64 << 20
MAX_ROW_BYTES = 64 << 20
"""A JSONL line longer than this is skipped unread (row_too_large); memory stays bounded by it."""
_CHUNK_CHARS = 1 << 20
_BATCH_ROWS = 1024
_DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Rows = Iterator[tuple[str, int, object]]


class InvalidRow(NamedTuple):
    """A row that could not be parsed; reason: invalid_json, invalid_utf8, json_too_deep (nesting beyond the
    interpreter's recursion limit), row_too_large (a JSONL line over MAX_ROW_BYTES), json_element_too_large,
    corrupt_compressed_file (a truncated or damaged .gz: the file's remaining rows are lost, the next file is
    read)."""

    reason: str


def resolve_source(source: str | os.PathLike, split: str = "train") -> Callable[[], Rows]:
    """Check `source` now and return a function that starts a fresh pass over its rows.

    Raises FileNotFoundError for a missing path, ValueError for an unsupported file or an
    unreachable Hub (offline machines fail at once, without waiting on the network)."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or a dataset id, got {type(source).__name__}")
    path = Path(source)
    if path.is_file():
        reader = _file_reader(path)
        return lambda: reader(path)
    if path.is_dir():
        if any((path / marker).exists() for marker in _DATASETS_MARKERS):
            return lambda: _datasets_dir_rows(path, split)
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) and not _hidden(p, path))
        if not files:
            raise ValueError(f"source directory {str(path)!r} has no {'/'.join(_DATA_SUFFIXES)} files and is not a saved `datasets` dataset")
        return lambda: (item for f in files for item in _file_reader(f)(f))
    if isinstance(source, str) and _HUB_ID.match(source) and _suffix(path) is None:
        _check_hub_reachable(source)
        return lambda: _hub_rows(source, split)
    raise FileNotFoundError(f"source {str(source)!r} is neither an existing file or directory nor a Hub dataset id")


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in _DATA_SUFFIXES if name.endswith(s)), None)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith((".", "_")) for part in path.relative_to(root).parts)


def _file_reader(path: Path) -> Callable[[Path], Rows]:
    suffix = _suffix(path)
    if suffix is None:
        raise ValueError(f"source file {str(path)!r} must end with one of {', '.join(_DATA_SUFFIXES)}")
    return _parquet_rows if suffix == ".parquet" else _json_rows


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


_CORRUPT = (EOFError, zlib.error, gzip.BadGzipFile)


def _json_rows(path: Path) -> Rows:
    try:
        with _open_binary(path) as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except _CORRUPT:
        yield str(path), 1, InvalidRow("corrupt_compressed_file")
        return
    rows = _json_list_rows(path) if head.startswith(b"[") else _jsonl_rows(path)
    number = 0
    try:
        for item in rows:
            number = item[1]
            yield item
    except _CORRUPT:
        yield str(path), number + 1, InvalidRow("corrupt_compressed_file")


def _lines(f) -> Iterator[bytes | None]:
    """The lines of binary file `f`; None for a line longer than MAX_ROW_BYTES (its bytes are skipped)."""
    while True:
        line = f.readline(MAX_ROW_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_ROW_BYTES and not line.endswith(b"\n"):
            while (rest := f.readline(_CHUNK_CHARS)) and not rest.endswith(b"\n"):
                pass
            yield None
            continue
        yield line


def _jsonl_rows(path: Path) -> Rows:
    name = str(path)
    with _open_binary(path) as f:
        for number, line in enumerate(_lines(f), 1):
            if line is None:
                yield name, number, InvalidRow("row_too_large")
                continue
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue
            try:
                yield name, number, json.loads(line)
            except UnicodeDecodeError:
                yield name, number, InvalidRow("invalid_utf8")
            except RecursionError:
                yield name, number, InvalidRow("json_too_deep")
            except ValueError:
                yield name, number, InvalidRow("invalid_json")


def _json_list_rows(path: Path) -> Rows:
    """Elements of a file holding one JSON list. After a malformed element the rest of the file
    cannot be resynchronized: that element is reported and the file ends there."""
    name = str(path)
    decoder = json.JSONDecoder()
    with _open_binary(path) as raw:
        f = io.TextIOWrapper(raw, encoding="utf-8-sig")
        buf, pos, eof = "", 0, False

        def fill(min_chars: int) -> bool:
            nonlocal buf, pos, eof
            try:
                chunk = f.read(min_chars)
            except UnicodeDecodeError:
                raise _Stop("invalid_utf8")
            buf, pos = buf[pos:] + chunk, 0
            eof = not chunk
            return bool(chunk)

        def skip_ws() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not fill(_CHUNK_CHARS):
                    return buf[pos] if pos < len(buf) else ""

        number = 0
        try:
            if skip_ws() != "[":
                raise _Stop("invalid_json")
            pos += 1
            while True:
                c = skip_ws()
                if c == "]":
                    return
                if number:
                    if c != ",":
                        raise _Stop("invalid_json")
                    pos += 1
                    skip_ws()
                while True:
                    try:
                        obj, end = decoder.raw_decode(buf, pos)
                        if end < len(buf) or eof:
                            break
                    except RecursionError:
                        raise _Stop("json_too_deep")
                    except ValueError:
                        if eof:
                            raise _Stop("invalid_json")
                    if len(buf) - pos > MAX_JSON_ELEMENT_CHARS:
                        raise _Stop("json_element_too_large")
                    fill(max(_CHUNK_CHARS, len(buf) - pos))
                number += 1
                pos = end
                yield name, number, obj
        except _Stop as stop:
            yield name, number + 1, InvalidRow(stop.reason)


class _Stop(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _parquet_rows(path: Path) -> Rows:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError("reading Parquet needs pyarrow: pip install pyarrow") from exc
    import pyarrow

    name, number = str(path), 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                yield name, number, row
    except (pyarrow.ArrowException, OSError):
        yield name, number + 1, InvalidRow("corrupt_parquet_file")


def _datasets_dir_rows(path: Path, split: str) -> Rows:
    try:
        import datasets
    except ImportError as exc:
        raise ValueError("reading a saved `datasets` directory needs the datasets package: pip install datasets") from exc
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"split {split!r} not in {str(path)!r}; available: {sorted(loaded)}")
        loaded = loaded[split]
    yield from _batched_rows(str(path), loaded.iter(batch_size=_BATCH_ROWS))


def _batched_rows(name: str, batches) -> Rows:
    number = 0
    for batch in batches:
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            number += 1
            yield name, number, dict(zip(columns, values))


def _check_hub_reachable(dataset_id: str) -> None:
    advice = "download it where there is network access (datasets.load_dataset(...).save_to_disk(DIR), or its Parquet/JSONL files) and pass the local path"
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            raise ValueError(f"source {dataset_id!r} is not a local path and {var} is set; {advice}")
    error = hub_unreachable()
    if error is not None:
        host, port = hub_endpoint()
        raise ValueError(f"source {dataset_id!r} is not a local path and the Hub ({host}:{port}) cannot be reached ({error}); {advice}")


def _hub_rows(dataset_id: str, split: str) -> Rows:
    try:
        import datasets
    except ImportError as exc:
        raise ValueError("reading a Hub dataset needs the datasets package: pip install datasets") from exc
    stream = datasets.load_dataset(dataset_id, split=split, streaming=True)
    number = 0
    for row in stream:
        number += 1
        yield dataset_id, number, row
