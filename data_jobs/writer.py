"""Transform 6 and the shard files: encode a segment into its WebDataset members, then pack members
into size-capped tar shards on any fsspec URL.

A sample is `<key>.mp4` (H.264 aligned crops, 25 fps), `<key>.wav` (16 kHz mono PCM),
`<key>.json` (provenance and face statistics) and `<key>.affine.npy` (float32 (frames, 2, 3),
source pixels -> crop pixels). A shard is built in a local temporary file and uploaded in one
atomic write, so a reader never sees half a shard.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_jobs.config import WriteConfig
from data_jobs.media import encode_mp4, encode_wav
from data_jobs.pipeline import Sample, Transform
from lipforcing import storage


def sample_metadata(sample: Sample, config_hash: str) -> dict[str, Any]:
    """The JSON member; also the source of the manifest row."""
    return {
        "key": sample.key,
        "source": sample.source,
        "audio_source": sample.audio_source,
        "dataset": sample.dataset,
        "identity": sample.identity,
        "split": sample.split,
        "start_s": round(sample.start_s, 6),
        "end_s": round(sample.end_s, 6),
        "num_frames": sample.end_frame - sample.start_frame,
        "fps": sample.fps,
        "sample_rate": sample.sample_rate,
        "width": int(sample.frames.shape[2]),
        "height": int(sample.frames.shape[1]),
        "source_width": sample.info.width,
        "source_height": sample.info.height,
        "source_fps": round(sample.info.fps, 4),
        "faces": sample.face_stats,
        "landmarks": np.round(sample.landmarks, 2).tolist(),
        "iqa": None if sample.iqa is None else round(sample.iqa, 3),
        "sync_conf": sample.sync_conf,
        "av_offset": sample.av_offset,
        "config_hash": config_hash,
    }


class Encode(Transform):
    """Turn the aligned frames, audio slice and affines into the sample's four members."""

    name = "encode"

    def __init__(self, config: WriteConfig, config_hash: str):
        self.config, self.config_hash = config, config_hash

    def __call__(self, sample: Sample) -> Sample:
        metadata = sample.metadata = sample_metadata(sample, self.config_hash)
        affine = io.BytesIO()
        np.save(affine, sample.affines)
        sample.outputs = {
            "mp4": encode_mp4(sample.frames, sample.fps, self.config.crf, self.config.preset),
            "wav": encode_wav(sample.audio, sample.sample_rate),
            "json": json.dumps(metadata).encode(),
            "affine.npy": affine.getvalue(),
        }
        sample.frames = None  # the encoded mp4 replaces ~200 MB of raw crops
        return sample


@dataclass
class ShardInfo:
    name: str
    url: str
    split: str = "train"
    samples: int = 0
    bytes: int = 0
    keys: list[str] = field(default_factory=list)


class ShardWriter:
    """Packs encoded samples into `<prefix>-<part:02d>.tar` shards, each capped by samples/bytes."""

    def __init__(self, shards_url: str, prefix: str, config: WriteConfig, split: str = "train"):
        self.shards_url, self.prefix, self.config, self.split = shards_url, prefix, config, split
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._temporary: str | None = None
        self.upload_s = 0.0

    def add(self, key: str, members: dict[str, bytes]) -> str:
        """Append one sample; returns the name of the shard it went into."""
        size = sum(len(v) for v in members.values())
        current = self.shards[-1] if self._tar is not None else None
        if current is not None and self._full(current, size):
            self._close()
            current = None
        if current is None:
            current = self._open()
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        current.samples += 1
        current.bytes += size
        current.keys.append(key)
        return current.name

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close()
        return self.shards

    def _full(self, shard: ShardInfo, incoming: int) -> bool:
        max_samples, max_bytes = self.config.shard_max_samples, self.config.shard_max_bytes
        return (max_samples > 0 and shard.samples >= max_samples) or (
            max_bytes > 0 and shard.samples > 0 and shard.bytes + incoming > max_bytes
        )

    def _open(self) -> ShardInfo:
        name = f"{self.prefix}-{len(self.shards):02d}"
        handle, self._temporary = tempfile.mkstemp(prefix="lipforcing-shard-", suffix=".tar")
        os.close(handle)
        self._tar = tarfile.open(self._temporary, "w", format=tarfile.USTAR_FORMAT)
        shard = ShardInfo(name=name, url=storage.join(self.shards_url, f"{name}.tar"), split=self.split)
        self.shards.append(shard)
        return shard

    def _close(self) -> None:
        self._tar.close()
        started = time.perf_counter()
        try:
            storage.upload_file(self._temporary, self.shards[-1].url)
        finally:
            os.remove(self._temporary)
        self.upload_s += time.perf_counter() - started
        self._tar, self._temporary = None, None
