"""Where the data is: list source files through fsspec and read their records, line-numbered.

A data path is a local path, a `file://`, `s3://`, `gs://` (any fsspec protocol) URI, a directory
(every file below it), a glob, a list of those, or `stdlib://` (this Python's own standard library,
present on every machine: the quickstart corpus). Every file is listed with its size and mtime,
which name the prepared set (a changed file re-prepares).

Large files are read as byte ranges (*work items*) split at newlines, so Ray Data can tokenize one
file on several workers; parquet files are split by row group. Records keep their line (row)
number within the item; `prepare` turns it into a line number within the file.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import fsspec

from raybig.errors import EXIT_SPEC, RaybigError

FileType = Literal["text", "jsonl", "parquet"]
_JSONL_EXT = (".jsonl", ".ndjson", ".json")
_PARQUET_EXT = (".parquet", ".pq")


class DataError(RaybigError):
    """The data cannot be used as configured (no files, bad record, bad template, too small); exit 2."""

    exit_code = EXIT_SPEC


class BadRecordError(DataError):
    """A record is malformed and `on_bad_record` is `fail`; the message names `file:line`."""


@dataclass(frozen=True)
class SourceFile:
    """One source file: its fsspec URL, size in bytes and modification time (POSIX seconds, or 0)."""

    uri: str
    size: int
    mtime: float

    def to_json(self) -> dict[str, Any]:
        """`{"uri", "size", "mtime"}` for the index."""
        return asdict(self)


@dataclass(frozen=True)
class WorkItem:
    """A unit of tokenization work: bytes `[start, end)` of a text/jsonl file, or one parquet row group.

    `part` is the item's ordinal within its file (items of a file are consecutive); `file_size`
    the file's size in bytes; `key` the file's path relative to the sources' common folder (it
    seeds the validation split, so a corpus moved elsewhere keeps its split).
    """

    file: int
    uri: str
    kind: FileType
    start: int
    end: int
    part: int
    file_size: int = 0
    key: str = ""


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            return float(v)
        except (TypeError, ValueError):
            # gcsfs gives ISO strings; their text is as good a change marker as a number.
            return float(abs(hash(str(v))) % 10**12)
    return 0.0


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    proto = _protocol(fs)
    return path if proto in ("file", "local") else f"{proto}://{path}"


def list_sources(path: str | Sequence[str]) -> list[SourceFile]:
    """Every file a data path names, sorted by URL, with size and mtime.

    Args:
        path: a path/URI/glob/directory, `stdlib://`, or a list of them.

    Returns:
        Sorted, de-duplicated `SourceFile`s (empty files included: `prepare` counts them).

    Raises:
        DataError: a path or glob matches no file (the message names it).
    """
    paths = [path] if isinstance(path, str) else list(path)
    out: dict[str, SourceFile] = {}
    for p in paths:
        found = _list_one(p)
        if not found:
            raise DataError(f"data.path {p!r} matched no files")
        out.update((f.uri, f) for f in found)
    return [out[k] for k in sorted(out)]


def stdlib_files() -> list[str]:
    """`stdlib://`: this Python's own standard-library sources (present on every machine), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    fs = fsspec.filesystem("file")
    files = [f for f in fs.glob(f"{root}/*.py") if "/site-packages/" not in f]
    files += fs.glob(f"{root}/json/*.py") + fs.glob(f"{root}/email/*.py")
    return sorted(files)


def _list_one(path: str) -> list[SourceFile]:
    if path.startswith("stdlib://"):
        fs = fsspec.filesystem("file")
        files = stdlib_files()
        return [SourceFile(f, int(i["size"]), _mtime(i)) for f in files for i in [fs.info(f)]]
    fs, _, found = fsspec.get_fs_token_paths(path)
    out: list[SourceFile] = []
    for p in found:
        info = fs.info(p)
        if info.get("type") == "directory":
            for sub, si in fs.find(p, detail=True).items():
                if si.get("type") != "directory":
                    out.append(SourceFile(_url(fs, sub), int(si.get("size") or 0), _mtime(si)))
        else:
            out.append(SourceFile(_url(fs, p), int(info.get("size") or 0), _mtime(info)))
    return out


def file_type(uri: str, declared: str = "auto") -> FileType:
    """`declared` unless `auto`; then by extension: `.jsonl/.ndjson/.json` jsonl, `.parquet` parquet, else text."""
    if declared != "auto":
        return declared  # type: ignore[return-value]
    low = uri.lower()
    if low.endswith(_PARQUET_EXT):
        return "parquet"
    if low.endswith(_JSONL_EXT):
        return "jsonl"
    return "text"


def plan_work(files: Sequence[SourceFile], declared: str = "auto", chunk_bytes: int = 16 << 20,
              ) -> list[WorkItem]:
    """Split files into work items: `chunk_bytes` ranges (text/jsonl) or row groups (parquet).

    Empty files get no item. Items are ordered by (file, part), which is the prepared order.
    """
    items: list[WorkItem] = []
    common = _common_folder([f.uri for f in files])
    for i, f in enumerate(files):
        key = f.uri[len(common):]
        if f.size == 0:
            continue
        kind = file_type(f.uri, declared)
        if kind == "parquet":
            import pyarrow.parquet as pq

            with fsspec.open(f.uri, "rb") as fh:
                groups = pq.ParquetFile(fh).metadata.num_row_groups
            items += [WorkItem(i, f.uri, kind, g, g + 1, g, f.size, key) for g in range(groups)]
            continue
        starts = list(range(0, f.size, max(1, chunk_bytes)))
        items += [WorkItem(i, f.uri, kind, s, min(s + chunk_bytes, f.size), k, f.size, key)
                  for k, s in enumerate(starts)]
    return items


def _common_folder(uris: Sequence[str]) -> str:
    """The longest common prefix of `uris` that ends with `/` ("" when there is none)."""
    if not uris:
        return ""
    prefix = os.path.commonprefix(list(uris))
    return prefix[:prefix.rfind("/") + 1]


def decode_utf8(data: bytes) -> tuple[str, int]:
    """`data` as text with invalid UTF-8 replaced by U+FFFD; returns (text, invalid byte count)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    parts, bad, pos = [], 0, 0
    while True:
        try:
            parts.append(data[pos:].decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            parts.append(data[pos:pos + e.start].decode("utf-8"))
            parts.append("\ufffd")
            bad += e.end - e.start
            pos += e.end
    return "".join(parts), bad


def read_range(item: WorkItem) -> bytes:
    """The whole lines whose first byte lies in `[item.start, item.end)` (a line owns its start)."""
    with fsspec.open(item.uri, "rb") as fh:
        if item.start > 0:
            fh.seek(item.start - 1)
            # Skip the line that began in the previous item (if the previous byte is a newline,
            # this reads just that newline and our first line starts exactly at `start`).
            skipped = fh.readline()
            pos = item.start - 1 + len(skipped)
        else:
            pos = 0
        if pos >= item.end:
            return b""
        data = fh.read(item.end - pos)
        if data and not data.endswith(b"\n"):
            data += fh.readline()
    return data


@dataclass
class Record:
    """One record of a work item.

    `line` is its line (row) number within the item, 1-based; `value` a dict (jsonl/parquet) or a
    str (a text chunk); `error` the reason it is malformed, when it is.
    """

    line: int
    value: Any = None
    error: str | None = None


@dataclass
class ItemRead:
    """What reading a work item gave: its records, its line count and replaced invalid UTF-8 bytes."""

    records: list[Record]
    n_lines: int
    replaced_bytes: int


def read_item(item: WorkItem, columns: Sequence[str] | None = None) -> ItemRead:
    """Read a work item's records.

    Text items give one record (the chunk's text). Jsonl items give one per non-blank line: a dict,
    or an error for a line that is not a JSON object. Parquet items give one dict per row (only
    `columns` are read when given and present).
    """
    if item.kind == "parquet":
        import pyarrow.parquet as pq

        with fsspec.open(item.uri, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = set(pf.schema_arrow.names)
            cols = [c for c in columns if c in names] if columns else None
            rows = pf.read_row_group(item.start, columns=cols).to_pylist()
        return ItemRead([Record(i + 1, r) for i, r in enumerate(rows)], len(rows), 0)
    data = read_range(item)
    text, bad = decode_utf8(data)
    n_lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    if item.kind == "text":
        return ItemRead([Record(1, text)], n_lines, bad)
    records: list[Record] = []
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            records.append(Record(i + 1, error=f"not JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(value, dict):
            records.append(Record(i + 1, error=f"a JSON {type(value).__name__}, not an object"))
        else:
            records.append(Record(i + 1, value))
    return ItemRead(records, n_lines, bad)
