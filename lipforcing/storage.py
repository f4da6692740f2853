"""Storage through fsspec URLs: a local path and `s3://bucket/key` are the same code.

S3 endpoint, credentials and region come from the usual AWS variables or profile (s3fs/botocore
read them; `AWS_ENDPOINT_URL` selects a non-AWS server). Nothing here logs credentials.

Writes are atomic: a reader sees either no file or the whole file. Locally we write a hidden
temporary file beside the target and rename it; on object stores the object appears only when its
single upload completes.

Transfers that touch the network (uploads, downloads, whole-object reads and writes) are retried
with backoff (`retry`): a dropped connection should cost a second try, not a task. Errors that
another try cannot fix (a missing object, no permission, a folder where a file should be) are
raised at once.

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
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")
# Errors a second attempt cannot fix.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
ATTEMPTS = 4


def retry(call: Callable[[], T], attempts: int = ATTEMPTS, backoff_s: float = 0.5) -> T:
    """`call()`, tried up to `attempts` times on transient errors, waiting backoff_s, 2x, 4x ... between."""
    for attempt in range(attempts):
        try:
            return call()
        except PERMANENT:
            raise
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def filesystem(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for a URL and the path inside it."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path


def is_local(url: str | Path) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def absolute(url: str | Path) -> str:
    """The location as one that names the same place from any working directory (a relative
    local path made absolute; URLs as they are), for records other jobs read later."""
    text = str(url)
    return text if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", text) else os.path.abspath(text)  # s3://, models:/ ...


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
    return retry(lambda: fs.cat_file(path))


def read_many(urls: list[str]) -> list[bytes]:
    """The bytes of many objects of one filesystem, fetched concurrently where the filesystem can
    (s3fs batches the requests): thousands of small files in the time of a few round trips."""
    if not urls:
        return []
    fs, _ = filesystem(urls[0])
    paths = [filesystem(url)[1] for url in urls]
    found = retry(lambda: fs.cat(paths, on_error="raise"))
    return [found[path] for path in paths]


def read_text(url: str | Path) -> str:
    return read_bytes(url).decode()


def glob(url_pattern: str) -> list[str]:
    """Matching URLs, sorted, with the scheme kept. Always a fresh listing: s3fs would otherwise
    answer from a listing it cached earlier, missing what other processes wrote since."""
    fs, path = filesystem(url_pattern)
    fs.invalidate_cache()
    return sorted(_with_scheme(url_pattern, fs, p) for p in fs.glob(path))


def remove(url: str | Path, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def write_bytes(url: str | Path, data: bytes) -> None:
    """Atomic whole-file write."""

    def write() -> None:
        with atomic_open(url) as handle:
            handle.write(data)

    retry(write)


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
        retry(lambda: fs.put_file(spool.name, path))  # a transient error must not lose what was written


def upload_folder(local_folder: str | Path, url: str | Path) -> None:
    """Copy every file under a local folder to the same relative paths under `url`."""
    for root, _, files in os.walk(local_folder):
        for name in files:
            path = os.path.join(root, name)
            upload_file(path, join(url, os.path.relpath(path, local_folder)))


def upload_file(local_path: str | Path, url: str | Path) -> None:
    """Copy a local file to `url` atomically."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        with open(local_path, "rb") as source, atomic_open(url) as target:
            while chunk := source.read(1 << 22):
                target.write(chunk)
    else:
        retry(lambda: fs.put_file(str(local_path), path))


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
        retry(lambda: fs.get_file(path, target))
        yield target


def _with_scheme(original: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return f"{protocol}://{path}"
