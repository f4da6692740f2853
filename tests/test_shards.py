"""The training loader: resampled shards, a shuffle buffer across clips, a fresh stream on resume,
bad samples skipped and counted, and an unusable dataset refused before any worker starts."""

from __future__ import annotations

import io
import itertools
import json
import os
import random

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds

from data_jobs.media import encode_mp4
from lipforcing.config import ConfigError
from lipforcing.data.shards import (
    RAW_FIELDS,
    LoaderConfig,
    Reader,
    SkipCounter,
    check_readable,
    decode_clip,
    decode_mp4,
    loaded,
    training_samples,
    worker_reader,
)
from lipforcing.data.windows import WindowConfig, cut_window, sample_window, windows

VIDEOS, SEGMENTS = 4, 8  # each shard holds consecutive segments of one source video, as the data job writes


def real_media() -> tuple[bytes, bytes]:
    """A 3-frame 16-px mp4 and a 0.12 s wav: what decode_clip accepts."""
    frames = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    wav = io.BytesIO()
    soundfile.write(wav, np.zeros(1920, dtype=np.float32), 16000, format="WAV")
    return encode_mp4(list(frames), 25), wav.getvalue()


def write_shards(folder, videos=VIDEOS, segments=SEGMENTS, missing_wav=frozenset(), broken_mp4=frozenset()) -> list[str]:
    """One shard per source video holding its consecutive segments, as the data job writes them."""
    os.makedirs(folder / "shards", exist_ok=True)
    mp4, wav = real_media()
    urls = []
    for video in range(videos):
        path = str(folder / "shards" / f"{video:05d}.tar")
        with wds.TarWriter(path) as sink:
            for segment in range(segments):
                key = f"video{video}_{segment:03d}"
                sample = {"__key__": key, "mp4": b"not a video" if key in broken_mp4 else mp4, "wav": wav, "json": b"{}"}
                if key in missing_wav:
                    del sample["wav"]
                sink.write(sample)
        urls.append(path)
    return urls


def keys(urls, reader: Reader, start: int = 0, count: int = 32, buffer: int = 16, skips: SkipCounter | None = None):
    stream = training_samples(urls, reader, 0, start, RAW_FIELDS, skips or SkipCounter(), buffer)
    return [s["__key__"] for s in itertools.islice(stream, count)]


def test_every_rank_reads_even_with_fewer_shards_than_ranks(tmp_path):
    urls = write_shards(tmp_path, videos=1)
    first, second = keys(urls, Reader(0, 2), count=20), keys(urls, Reader(1, 2), count=20)
    assert len(first) == len(second) == 20  # a second pass through the one shard, not a hang
    assert first != second  # each rank draws its own order


def test_the_buffer_mixes_clips_of_different_videos(tmp_path):
    urls = write_shards(tmp_path)
    videos = [k.split("_")[0] for k in keys(urls, Reader(0, 2), count=24)]
    unshuffled_neighbours = sum(a == b for a, b in itertools.pairwise(videos[:SEGMENTS]))  # file order: all 7 alike
    neighbours = sum(a == b for a, b in itertools.pairwise(videos))
    assert len(set(videos[:SEGMENTS])) >= 2 and unshuffled_neighbours < SEGMENTS - 1
    assert neighbours < 0.6 * (len(videos) - 1)


def test_a_resumed_run_draws_a_fresh_stream_and_a_rerun_the_same(tmp_path):
    urls = write_shards(tmp_path)
    assert keys(urls, Reader(0, 2), start=0) == keys(urls, Reader(0, 2), start=0)
    assert keys(urls, Reader(0, 2), start=0) != keys(urls, Reader(0, 2), start=5)


def test_bad_tars_and_incomplete_samples_are_skipped_and_counted(tmp_path):
    urls = write_shards(tmp_path, videos=2, missing_wav={"video0_003", "video1_005"})
    corrupt = str(tmp_path / "shards" / "99999.tar")
    with open(corrupt, "wb") as handle:
        handle.write(b"\0garbage" * 100)
    skips = SkipCounter()
    seen = keys([*urls, corrupt], Reader(), count=60, skips=skips)
    assert len(seen) == 60 and not {"video0_003", "video1_005"} & set(seen)
    assert skips.total >= 2  # each incomplete sample at least once, plus each draw of the bad tar


class DecodedKeys(torch.utils.data.IterableDataset):
    """The first clips a loader process decodes (undecodable ones are skipped by the handler)."""

    def __init__(self, urls: list[str], count: int):
        self.urls, self.count, self.skips = urls, count, SkipCounter()

    def __iter__(self):
        decode = wds.map(decode_clip, handler=self.skips)
        stream = training_samples(self.urls, worker_reader(0, 1), 0, 0, RAW_FIELDS, self.skips, 4, decode)
        for clip in itertools.islice(stream, self.count):
            yield clip.key


def test_undecodable_samples_are_skipped_in_loader_processes_and_counted_in_the_rank(tmp_path):
    broken = {f"video0_{i:03d}" for i in range(0, SEGMENTS, 2)}
    urls = write_shards(tmp_path, videos=1, broken_mp4=broken)
    dataset = DecodedKeys(urls, count=6)
    seen = list(loaded(dataset, LoaderConfig(workers=2)))
    assert len(seen) == 12 and not broken & set(seen)  # two processes, six good clips each
    assert dataset.skips.total >= 2  # counted by the loader processes, read here


def talking_sample(key: str, frames: int, size: int = 32, num_frames: bool = True) -> dict:
    """A raw shard sample as the data job writes it: mp4, 16 kHz wav, json with num_frames."""
    video = np.random.default_rng(1).integers(0, 255, (frames, size, size, 3), dtype=np.uint8)
    wav = io.BytesIO()
    soundfile.write(wav, np.random.default_rng(2).standard_normal(frames * 640).astype(np.float32) * 0.1, 16000, format="WAV")
    metadata = {"dataset": "t", **({"num_frames": frames} if num_frames else {})}
    return {"__key__": key, "mp4": encode_mp4(list(video), 25), "wav": wav.getvalue(), "json": json.dumps(metadata).encode()}


@pytest.mark.parametrize("num_frames", [True, False])
def test_a_window_decoded_from_its_own_frames_equals_one_cut_from_the_whole_clip(num_frames):
    """The loader decodes only the frames a window uses (scaled by the decoder); the `make encode`
    cache cuts from the whole decoded clip: the same plan must give the same tensors."""
    sample = talking_sample("k", frames=20, num_frames=num_frames)
    config = WindowConfig(frames=9, size=16, reference="clip_uniform")
    fast = sample_window(sample, config, random.Random(3), reference_sequence=True)
    whole = cut_window(decode_clip(sample, size=16), config, random.Random(3), reference_sequence=True)
    for name in ("video", "reference", "reference_sequence", "audio"):
        torch.testing.assert_close(getattr(fast, name), getattr(whole, name), rtol=0, atol=0)
    assert fast.video.shape == (9, 3, 16, 16) and fast.audio.shape == (9 * 640,)
    all_frames = decode_mp4(sample["mp4"])
    assert np.array_equal(decode_mp4(sample["mp4"], [5, 2, 5]), all_frames[[5, 2, 5]])  # any order, repeats


def test_a_dataset_that_never_yields_a_window_fails_instead_of_spinning():
    short = talking_sample("short", frames=5)
    skips = SkipCounter()
    with pytest.raises(RuntimeError, match="training window"):
        next(windows(itertools.repeat(short), WindowConfig(frames=9, size=8), 0, skips))
    broken = {**talking_sample("broken", frames=20), "mp4": b"not a video"}
    with pytest.raises(RuntimeError, match="training window"):
        next(windows(itertools.repeat(broken), WindowConfig(frames=9, size=8), 0, skips))
    assert skips.total == 1000  # every undecodable sample counted, none fatal


def test_an_empty_unreadable_or_incomplete_dataset_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'data'.*no WebDataset shards"):
        check_readable(str(tmp_path / "nothing"), RAW_FIELDS, "data")
    os.makedirs(tmp_path / "bad" / "shards")
    (tmp_path / "bad" / "shards" / "00000.tar").write_bytes(b"\0garbage" * 100)
    with pytest.raises(ConfigError, match="'data': cannot read"):
        check_readable(str(tmp_path / "bad"), RAW_FIELDS, "data")
    write_shards(tmp_path / "no_wav", videos=1, missing_wav={f"video0_{i:03d}" for i in range(SEGMENTS)})
    with pytest.raises(ConfigError, match=r"'latents'.*lack \['pth'\]"):
        check_readable(str(tmp_path / "no_wav"), ("pth",), "latents")
    assert len(check_readable(str(tmp_path / "no_wav"), ("mp4", "json"), "data")) == 1
