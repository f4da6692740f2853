"""What to ingest: a folder / object-store prefix of videos, or a CSV/Parquet list.

- Folder: every file with a video extension, recursively. A video without an audio stream is
  paired with a same-named audio file beside it (`clip.mp4` + `clip.wav`). The dataset tag is the
  first sub-folder under the root (`raw/hdtf/x.mp4` -> `hdtf`), or the root's own name.
- List: columns `video`, optional `audio` and `dataset`; relative paths are relative to the list.

Inputs come back sorted by URL, so the partition into tasks, and with it every shard name, is a
pure function of the input list.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
from dataclasses import dataclass

import pandas as pd

from lipforcing import storage

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")
AUDIO_EXTENSIONS = (".wav", ".flac", ".m4a", ".mp3", ".aac", ".ogg")
LIST_EXTENSIONS = (".csv", ".parquet")


@dataclass(frozen=True)
class InputItem:
    video: str
    dataset: str
    audio: str | None = None
    key_stem: str = ""


def list_inputs(url: str) -> list[InputItem]:
    if not storage.exists(url):
        raise FileNotFoundError(f"input {url} does not exist")
    url = canonical_url(url)
    if url.lower().endswith(LIST_EXTENSIONS):
        items = _from_list(url)
        root = posixpath.dirname(url.rstrip("/"))
    else:
        items = _from_folder(url)
        root = url
    items = sorted({item.video: item for item in items}.values(), key=lambda item: item.video)
    return [_with_key(item, root) for item in items]


def canonical_url(url: str) -> str:
    """Local paths made absolute (what fsspec's glob returns), remote URLs as given."""
    return storage.filesystem(url)[1] if storage.is_local(url) else url.rstrip("/")


def key_stem(video: str, root: str) -> str:
    """A WebDataset-safe, stable stem: readable file stem + hash of the path relative to the root
    (so the same tree on local disk and on S3 gives the same keys)."""
    relative = posixpath.relpath(video, root.rstrip("/")) if video.startswith(root.rstrip("/")) else video
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", posixpath.splitext(posixpath.basename(video))[0])[:48]
    return f"{stem}-{hashlib.sha1(relative.encode()).hexdigest()[:8]}"


def _with_key(item: InputItem, root: str) -> InputItem:
    return InputItem(item.video, item.dataset, item.audio, key_stem(item.video, root))


def _from_folder(url: str) -> list[InputItem]:
    base = url.rstrip("/")
    files = storage.glob(f"{base}/**")
    by_stem = {posixpath.splitext(f)[0]: f for f in files if f.lower().endswith(AUDIO_EXTENSIONS)}
    items = []
    for path in files:
        if not path.lower().endswith(VIDEO_EXTENSIONS):
            continue
        parts = path[len(base) + 1 :].split("/")
        dataset = parts[0] if len(parts) > 1 else posixpath.basename(base)
        items.append(InputItem(path, dataset, by_stem.get(posixpath.splitext(path)[0])))
    return items


def _from_list(url: str) -> list[InputItem]:
    data = storage.read_bytes(url)
    table = (
        pd.read_parquet(io.BytesIO(data))
        if url.lower().endswith(".parquet")
        else pd.read_csv(io.BytesIO(data))
    )
    if "video" not in table.columns:
        raise ValueError(f"input list {url} needs a 'video' column (has {list(table.columns)})")
    folder = posixpath.dirname(url)
    items = []
    for row in table.to_dict("records"):
        audio = row.get("audio")
        audio = _resolve(folder, audio) if isinstance(audio, str) and audio.strip() else None
        dataset = row.get("dataset")
        dataset = dataset if isinstance(dataset, str) and dataset.strip() else "default"
        items.append(InputItem(_resolve(folder, str(row["video"])), dataset, audio))
    return items


def _resolve(folder: str, path: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    return storage.join(folder, path) if folder else path
