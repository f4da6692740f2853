"""Storage through fsspec URLs: a local path and `s3://bucket/key` are the same code.

S3 endpoint, credentials and region come from the usual AWS variables or profile (s3fs/botocore
read them; `AWS_ENDPOINT_URL` selects a non-AWS server). Nothing here logs credentials.

Writes are atomic: a reader sees either no file or the whole file. Locally we write a hidden
temporary file beside the target and rename it; on object stores the object appears only when its
single upload completes.

Code that needs a local path (decoders, `from_pretrained` folders) asks `cached` (weights: copied
once per machine, kept) or `temporary_local` (inputs: copied for the duration of a block).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import shutil
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


CACHE = os.path.join(tempfile.gettempdir(), "lipforcing-cache")


def require(url: str, key: str) -> None:
    """A config value that must name an existing file or folder: a ConfigError naming `key` otherwise."""
    from lipforcing.config import ConfigError

    if not url:
        raise ConfigError(f"config key '{key}' is empty: give the path or URL of the weights")
    if not exists(url):
        raise ConfigError(f"config key '{key}': {url} does not exist")


def cached(url: str | Path) -> str:
    """A local path holding `url`, a file or a folder: the path itself when local, else a copy made
    once per machine under CACHE and shared by every process there (the first takes a lock and
    downloads, the others wait for it). A file is keyed by its URL and version (ETag or mtime, and
    size), so a rewritten object, like a stage rerun with force=true, is fetched anew."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return path
    is_folder = fs.isdir(path)
    version = "" if is_folder else json.dumps([str(fs.info(path).get(k)) for k in ("ETag", "mtime", "size")])
    folder = os.path.join(CACHE, hashlib.sha1(f"{url}\n{version}".encode()).hexdigest()[:16])
    target = os.path.join(folder, posixpath.basename(path.rstrip("/")))
    if os.path.exists(target):
        return target
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other processes of this machine wait here, then find it
        if not os.path.exists(target):
            partial = f"{target}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # a crash leaves no half copy
            if is_folder:
                fs.get(path.rstrip("/") + "/", partial, recursive=True)
            else:
                fs.get_file(path, partial)
            try:
                os.replace(partial, target)
            except OSError:  # a folder someone finished without the lock (a filesystem ignoring flock): keep theirs
                shutil.rmtree(partial, ignore_errors=True)
                if not os.path.exists(target):
                    raise
    return target


@contextlib.contextmanager
def temporary_local(url: str | Path) -> Iterator[str]:
    """A local path holding the bytes of `url` for the block (the path itself when already local)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lipforcing-in-") as folder:
        target = os.path.join(folder, f"input{os.path.splitext(path)[1]}")
        fs.get_file(path, target)
        yield target


def _with_scheme(original: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return f"{protocol}://{path}"
