"""fsspec storage helpers: URIs for run records, and the form Ray Train wants."""

from __future__ import annotations

import os
from typing import Any

import fsspec

# Schemes pyarrow resolves natively; anything else goes through pyarrow's FSSpecHandler.
_PYARROW_NATIVE = {"s3", "gs", "gcs", "hdfs", "abfs", "abfss"}


def is_local(uri: str) -> bool:
    """True for a plain path or a `file://` URI (no other scheme)."""
    return "://" not in uri or uri.startswith("file://")


def normalize(uri: str) -> str:
    """Absolute local paths; URIs unchanged."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """`uri` normalized, with `parts` appended by `/` (never `os.path.join`: URIs keep their form)."""
    base = normalize(uri)
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def fs_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(normalize(uri))
    return fs, path


def write_text(uri: str, text: str) -> None:
    """Write `text` to `uri` through a temporary name, so readers never see half a file.

    Parent folders are created. Raises the filesystem's own OSError on failure.
    """
    fs, path = fs_for(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "w") as f:
        f.write(text)
    fs.mv(tmp, path)  # publish atomically where the filesystem allows


def read_text(uri: str) -> str:
    """The whole text of `uri`. Raises FileNotFoundError if it is missing."""
    fs, path = fs_for(uri)
    with fs.open(path, "r") as f:
        return f.read()


def exists(uri: str) -> bool:
    """True if a file or folder exists at `uri`."""
    fs, path = fs_for(uri)
    return fs.exists(path)


def ray_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for ray.train.RunConfig."""
    uri = normalize(uri)
    if "://" not in uri:
        return uri, None
    scheme = uri.split("://", 1)[0]
    if scheme in _PYARROW_NATIVE:
        return uri, None
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(uri)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def download_dir(uri: str, dest: str) -> str:
    """Copy a directory (any fsspec URI) into local `dest`; return the local path."""
    if is_local(uri):
        return normalize(uri)
    fs, path = fs_for(uri)
    fs.get(path.rstrip("/") + "/", dest.rstrip("/") + "/", recursive=True)
    return dest
