"""Reading the data job's WebDataset shards (local or s3://) for training and evaluation.

Training reads an endless stream built from webdataset's own pieces: every reader (a training
rank x one of its DataLoader processes) resamples shards with replacement from its own seed, so no
reader ever runs dry, however few shards there are; a shuffle buffer mixes samples across clips;
a resumed run draws a fresh stream (the seed includes the iteration it resumes from) instead of
replaying the first batches; and a corrupt tar, an undecodable sample or one missing a field is
skipped and counted, never a crashed worker. Evaluation and the cache jobs read each sample once,
in order (`epoch_samples`).
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
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
from lipforcing.config import ConfigError

log = logging.getLogger("lipforcing.data")
RAW_FIELDS = ("mp4", "wav", "json")  # what a data-job sample holds


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
    """The shards of a dataset. The data job's output has a manifest, which is the dataset: its
    shards, and no others a killed or older run may have left in `shards/`. Otherwise (a folder of
    tars, the encode job's latents) every `*.tar` under `<location>/shards` or `location` itself."""
    manifest = storage.join(location, "manifest.parquet")
    if storage.exists(manifest):
        import pandas as pd

        names = sorted(set(pd.read_parquet(io.BytesIO(storage.read_bytes(manifest)), columns=["shard"])["shard"]))
        if names:
            return [storage.join(location, "shards", f"{name}.tar") for name in names]
        raise FileNotFoundError(f"the manifest of {location!r} lists no samples (see its rejects.parquet)")
    for pattern in (storage.join(location, "shards", "*.tar"), storage.join(location, "*.tar")):
        urls = storage.glob(pattern)
        if urls:
            return urls
    raise FileNotFoundError(f"no WebDataset shards (*.tar) under {location!r}")


def epoch_samples(urls: list[str], reader: Reader, seed: int, epoch: int) -> Iterator[dict[str, Any]]:
    """This reader's raw samples (dicts of bytes keyed by extension) for one epoch."""
    order = list(urls)
    random.Random(seed * 100_003 + epoch).shuffle(order)
    yield from wds.tarfile_to_samples()(iter({"url": u} for u in order[reader.index :: reader.count]))


@dataclass
class LoaderConfig:
    """How training reads shards."""

    workers: int = 0  # torch DataLoader processes per training worker (decode off the training loop)
    shuffle_buffer: int = 64  # samples mixed before use (raw: compressed clips, a few MB each)
    prefetch: int = 2  # batches each DataLoader process prepares ahead


class SkipCounter:
    """Samples a stream skipped (unreadable tar, undecodable or incomplete sample), counted across
    the DataLoader processes of a rank: a webdataset `handler` that logs and continues."""

    def __init__(self):
        self._count = multiprocessing.get_context("fork").Value("q", 0)  # shared with forked loaders

    def __call__(self, error: Exception) -> bool:
        with self._count.get_lock():
            self._count.value += 1
        log.warning("skipped a sample: %s: %s", type(error).__name__, error)
        return True

    @property
    def total(self) -> int:
        return int(self._count.value)

    def __getstate__(self):  # a spawned loader process counts on its own
        return {}

    def __setstate__(self, state):
        self.__init__()


def loaded(dataset: torch.utils.data.IterableDataset, config: LoaderConfig) -> Iterator[Any]:
    """Iterate a self-batching dataset in `config.workers` DataLoader processes (0: in this one)."""
    prefetch = config.prefetch if config.workers else None
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=config.workers, prefetch_factor=prefetch))


class MissingFields(ValueError):
    pass


def require_fields(fields: tuple[str, ...]):
    """A webdataset map that refuses (for the handler to skip) a sample lacking any of `fields`."""

    def check(sample: dict[str, Any]) -> dict[str, Any]:
        missing = [f for f in fields if f not in sample]
        if missing:
            raise MissingFields(f"sample {sample.get('__key__')!r} of {sample.get('__url__')!r} lacks {missing}")
        return sample

    return check


def training_samples(
    urls: list[str],
    reader: Reader,
    seed: int,
    start: int,
    fields: tuple[str, ...],
    skips: SkipCounter,
    shuffle_buffer: int,
    *stages: Any,
) -> Iterator[Any]:
    """Endless samples for one reader: shards resampled with replacement (seeded by the job seed, the
    reader and the iteration training starts at), complete samples only, shuffled, then `stages`
    (webdataset filters, e.g. `wds.map(decode_clip, handler=skips)`)."""
    stream_seed = (seed, reader.index, start)  # ints only: their hash is the same in every process
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=lambda: hash(stream_seed), deterministic=True),
        wds.tarfile_to_samples(handler=skips),
        wds.map(require_fields(fields), handler=skips),
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=hash((*stream_seed, 1))),
        *stages,
    )
    return iter(pipeline)


class DryStream:
    """Fails a reader after `limit` samples in a row gave nothing usable (all filtered out, too
    short, held out): with resampled shards such a dataset would otherwise spin forever."""

    def __init__(self, what: str, limit: int = 1000):
        self.what, self.limit, self.unused_in_a_row = what, limit, 0

    def used(self) -> None:
        self.unused_in_a_row = 0

    def unused(self) -> None:
        self.unused_in_a_row += 1
        if self.unused_in_a_row >= self.limit:
            raise RuntimeError(f"{self.limit} samples in a row gave no {self.what}: check the data and the filters")


def check_readable(location: str, fields: tuple[str, ...], key: str) -> list[str]:
    """The shard URLs under `location`, after reading its first sample: an empty, unreadable or
    incomplete dataset is a config error naming `key` before any worker is started."""
    try:
        urls = shard_urls(location)
    except FileNotFoundError as error:
        raise ConfigError(f"config key '{key}': {error}") from None
    try:
        first = next(wds.tarfile_to_samples()(iter([{"url": urls[0]}])), None)
    except Exception as error:  # noqa: BLE001 - whatever the tar reader raises, the user needs the file
        raise ConfigError(f"config key '{key}': cannot read {urls[0]}: {type(error).__name__}: {error}") from None
    if first is None:
        raise ConfigError(f"config key '{key}': {urls[0]} holds no samples")
    missing = [f for f in fields if f not in first]
    if missing:
        raise ConfigError(f"config key '{key}': samples of {urls[0]} lack {missing} (expected {list(fields)})")
    return urls


def worker_reader(rank: int, world_size: int) -> Reader:
    """The Reader for the current torch DataLoader worker of this rank."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return Reader(rank, world_size)
    return Reader(rank, world_size, info.id, info.num_workers)


def decode_mp4(data: bytes, indices: list[int] | None = None, size: int | None = None) -> np.ndarray:
    """Frames of an in-memory mp4 as uint8 RGB [N, H, W, 3]: all of them, or those at `indices` (in
    that order), decoding no further than the last one and converting only those, scaled by the
    decoder's area filter to `size` x `size` when given. A training window needs 33-81 small frames
    of a 125-250 frame 512-px clip: this skips most of the decode, colour conversion and resize."""
    wanted = None if indices is None else set(indices)
    scale = {} if size is None else {"width": size, "height": size, "interpolation": "AREA"}
    frames: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if wanted is None or index in wanted:
                frames[index] = frame.to_ndarray(format="rgb24", **scale)
            if wanted is not None and index >= max(wanted):
                break
    if indices is None:
        return np.stack([frames[i] for i in sorted(frames)])
    missing = sorted(set(indices) - set(frames))
    if missing:
        raise ValueError(f"the mp4 has {len(frames) and max(frames) + 1} frames; frame {missing[0]} was asked for")
    return np.stack([frames[i] for i in indices])


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


def decode_clip(sample: dict[str, Any], size: int | None = None) -> Clip:
    """The whole sample decoded; frames scaled to `size` x `size` by the decoder when given."""
    audio, rate = decode_wav(sample["wav"])
    return Clip(
        key=sample["__key__"],
        frames=decode_mp4(sample["mp4"], size=size),
        audio=audio,
        sample_rate=rate,
        metadata=json.loads(sample["json"]),
    )
