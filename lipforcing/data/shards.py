"""Reading the data job's WebDataset shards (local or s3://) for training.

An endless, epoch-structured stream. In every epoch the shard order is reshuffled from the seed,
and the stream is split so that no sample goes to two readers (rank x dataloader worker):
- with at least as many shards as readers, each reader takes every n-th shard;
- with fewer shards (small datasets, the demo), every reader scans the shards and keeps every n-th
  sample, so no reader is left without data and none hangs.
Epochs repeat forever (the `resampled=True` behaviour); `with_epoch`-style length is the caller's
`samples_per_epoch`.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import soundfile
import torch
import webdataset as wds

from lipforcing import storage


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
    fs, path = storage.filesystem(url)
    return fs.open(path, mode)


# webdataset opens s3:// (and other object-store) URLs through fsspec, with the AWS variables.
for _scheme in ("s3", "gs", "gcs", "az", "abfs"):
    wds.gopen_schemes.setdefault(_scheme, _fsspec_gopen)


@dataclass
class Reader:
    """Who is reading: the training rank and the dataloader worker inside it."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def shard_urls(location: str) -> list[str]:
    """All `*.tar` shards under `<location>/shards` (or `location` itself when it holds the tars)."""
    for pattern in (storage.join(location, "shards", "*.tar"), storage.join(location, "*.tar")):
        urls = storage.glob(pattern)
        if urls:
            return urls
    raise FileNotFoundError(f"no WebDataset shards (*.tar) under {location!r}")


def epoch_samples(urls: list[str], reader: Reader, seed: int, epoch: int) -> Iterator[dict[str, Any]]:
    """This reader's raw samples (dicts of bytes keyed by extension) for one epoch."""
    order = list(urls)
    random.Random(seed * 100_003 + epoch).shuffle(order)
    if len(order) >= reader.count:
        mine = order[reader.index :: reader.count]
        yield from wds.tarfile_to_samples()(iter({"url": u} for u in mine))
        return
    stream = wds.tarfile_to_samples()(iter({"url": u} for u in order))
    yield from itertools.islice(stream, reader.index, None, reader.count)


def stream_samples(urls: list[str], reader: Reader, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Endless: epoch after epoch of `epoch_samples`, each epoch shuffled differently."""
    for epoch in itertools.count():
        yield from epoch_samples(urls, reader, seed, epoch)


def worker_reader(rank: int, world_size: int) -> Reader:
    """The Reader for the current torch DataLoader worker of this rank."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return Reader(rank, world_size)
    return Reader(rank, world_size, info.id, info.num_workers)


def decode_mp4(data: bytes) -> np.ndarray:
    """All frames of an in-memory mp4 as uint8 RGB [T, H, W, 3]."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Float32 mono audio and its rate."""
    audio, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate


@dataclass
class Clip:
    """One decoded training sample."""

    key: str
    frames: np.ndarray  # uint8 [T, H, W, 3], 25 fps aligned face crops
    audio: np.ndarray  # float32 [S], 16 kHz mono, in sync with the frames
    sample_rate: int
    metadata: dict[str, Any]


def decode_clip(sample: dict[str, Any]) -> Clip:
    audio, rate = decode_wav(sample["wav"])
    return Clip(
        key=sample["__key__"],
        frames=decode_mp4(sample["mp4"]),
        audio=audio,
        sample_rate=rate,
        metadata=json.loads(sample["json"]),
    )
