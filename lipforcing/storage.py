"""Storage through fsspec URLs: a local path and `s3://bucket/key` are the same code.

S3 endpoint, credentials and region come from the usual AWS variables or profile (s3fs/botocore
read them; `AWS_ENDPOINT_URL` selects a non-AWS server). Nothing here logs credentials.

Writes are atomic: a reader sees either no file or the whole file. Locally we write a hidden
temporary file beside the target and rename it; on object stores the object appears only when its
single upload completes.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for a URL and the path inside it."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path


def is_local(url: str | Path) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def join(url: str | Path, *parts: str) -> str:
    """Join URL parts with '/', keeping the scheme (`s3://b/x` + `y` -> `s3://b/x/y`)."""
    base = str(url).rstrip("/")
    return posixpath.join(base, *(p.strip("/") for p in parts)) if parts else base


def exists(url: str | Path) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def makedirs(url: str | Path) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def read_bytes(url: str | Path) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as handle:
        return handle.read()


def read_text(url: str | Path) -> str:
    return read_bytes(url).decode()


def glob(url_pattern: str) -> list[str]:
    """Matching URLs, sorted, with the scheme kept."""
    fs, path = filesystem(url_pattern)
    return sorted(_with_scheme(url_pattern, fs, p) for p in fs.glob(path))


def remove(url: str | Path, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def write_bytes(url: str | Path, data: bytes) -> None:
    """Atomic whole-file write."""
    with atomic_open(url) as handle:
        handle.write(data)


def write_text(url: str | Path, text: str) -> None:
    write_bytes(url, text.encode())


@contextlib.contextmanager
def atomic_open(url: str | Path) -> Iterator[IO[bytes]]:
    """Open `url` for binary writing; the file becomes visible only when the block exits cleanly.

    An exception inside the block leaves no file and no temporary behind.
    """
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(temporary, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return
    with tempfile.NamedTemporaryFile(prefix="lipforcing-upload-", delete=True) as spool:
        yield spool
        spool.flush()
        fs.put_file(spool.name, path)


def upload_file(local_path: str | Path, url: str | Path) -> None:
    """Copy a local file to `url` atomically."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        with open(local_path, "rb") as source, atomic_open(url) as target:
            while chunk := source.read(1 << 22):
                target.write(chunk)
    else:
        fs.put_file(str(local_path), path)


def _with_scheme(original: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return f"{protocol}://{path}"
