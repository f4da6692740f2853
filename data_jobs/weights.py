"""Model weights given by path or URL in the config: nothing is downloaded from the internet.

A missing setting or file is a `ConfigError` naming the config key, raised before work starts.
Object-store weights are copied once per machine into a local cache keyed by their URL.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from lipforcing import storage
from lipforcing.config import ConfigError

CACHE = os.path.join(tempfile.gettempdir(), "lipforcing-weights")


def check_exists(url: str, key: str) -> None:
    if not url:
        raise ConfigError(f"config key '{key}' is empty: give the path or URL of the weights")
    if not storage.exists(url):
        raise ConfigError(f"config key '{key}': {url} does not exist")


def local_file(url: str, key: str) -> str:
    check_exists(url, key)
    if storage.is_local(url):
        return storage.filesystem(url)[1]
    target = os.path.join(CACHE, hashlib.sha1(url.encode()).hexdigest()[:16], os.path.basename(url))
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs, path = storage.filesystem(url)
        partial = f"{target}.part-{os.getpid()}"
        fs.get_file(path, partial)
        os.replace(partial, target)
    return target


def local_folder(url: str, key: str) -> str:
    check_exists(url, key)
    if storage.is_local(url):
        return storage.filesystem(url)[1]
    target = os.path.join(CACHE, hashlib.sha1(url.encode()).hexdigest()[:16])
    if not os.path.isdir(target):
        fs, path = storage.filesystem(url)
        partial = f"{target}.part-{os.getpid()}"
        fs.get(path.rstrip("/") + "/", partial, recursive=True)
        try:
            os.replace(partial, target)
        except OSError:  # another worker on this machine finished the same download first
            shutil.rmtree(partial)
            if not os.path.isdir(target):
                raise
    return target
