"""Bad and unusual inputs of the data job: each one becomes samples or a reject row with a clear
reason, never a crash or an `error` reject. Inputs are real encodes (PyAV/FFmpeg) written into
tmp_path and run through `list_inputs` + `ingest_inputs`, as one task of the job runs them."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from data_jobs.config import DataJobConfig, validate
from data_jobs.ingest import ingest_inputs
from data_jobs.inputs import list_inputs
from data_jobs.media import VideoFrames, cfr_indices, encode_wav, read_audio
from data_jobs.pipeline import Sample, run_stages
from data_jobs.probe import Probe
from data_jobs.resample import Resample
from data_jobs.sample import ClipSpec, Speech, render_frame
from lipforcing.config import ConfigError
from pipelines.jobs import resolve_config

# 1-4 s segments, so a 2 s clip is one sample and the tests stay fast.
SHORT_SEGMENTS = ("ingest.min_segment_s=1", "ingest.max_segment_s=4")
RATE = 16000


@dataclass
class Outcome:
    samples: dict[str, dict[str, bytes]]  # key -> members
    rejects: list[dict[str, Any]]

    def reasons(self) -> dict[str, str]:
        """File name -> "stage/reason" of its reject."""
        return {Path(r["source"]).name: f"{r['stage']}/{r['reason']}" for r in self.rejects}

    def detail(self, name: str) -> str:
        return next(r["detail"] for r in self.rejects if Path(r["source"]).name == name)


def ingest(url: Path, *overrides: str) -> Outcome:
    """One task over every input under `url` (a folder or a list), samples kept in memory."""
    written: dict[str, dict[str, bytes]] = {}

    def write(item, key: str, members: dict[str, bytes]) -> str:
        written[key] = members
        return "shard-00"

    config = resolve_config(DataJobConfig, [*SHORT_SEGMENTS, *overrides])
    result = ingest_inputs(list_inputs(str(url)), config, "test", write)
    assert [r for r in result.rejects if r["reason"] == "error"] == []
    return Outcome(written, result.rejects)


def write_media(
    path: Path,
    frames: Iterable[np.ndarray] | None,
    fps: float = 25,
    *,
    audio: np.ndarray | None = None,
    pts: list[int] | None = None,
    container: str | None = None,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    audio_codec: str = "aac",
) -> Path:
    """A real encode: RGB frames (pts in 1/fps units when given) and/or mono float audio at RATE."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = list(frames) if frames is not None else []
    with av.open(str(path), "w", format=container) as output:
        if frames:
            video = output.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            video.height, video.width = frames[0].shape[:2]
            video.pix_fmt = pix_fmt
        if audio is not None:
            sound = output.add_stream(audio_codec, rate=RATE, layout="mono")
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[index], Fraction(1, round(fps))
            output.mux(video.encode(frame))
        if frames:
            output.mux(video.encode())
        if audio is not None:
            chunk = av.AudioFrame.from_ndarray(audio[None].astype(np.float32), format="flt", layout="mono")
            chunk.sample_rate, chunk.pts = RATE, 0
            output.mux(sound.encode(chunk))
            output.mux(sound.encode())
    return path


def tone(seconds: float) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(round(seconds * RATE)) / RATE)).astype(np.float32)


def plain_frames(count: int, size: tuple[int, int] = (96, 96)) -> list[np.ndarray]:
    width, height = size
    return [np.full((height, width, 3), 100 + k % 3, np.uint8) for k in range(count)]


def face_clip(
    path: Path, fps: float = 25, seconds: float = 2.0, size: tuple[int, int] = (256, 256), **kw: Any
) -> Path:
    """A talking face (the embedded sample's renderer) with its speech track."""
    spec = ClipSpec(path.stem, ("astronaut",), fps, RATE, 1, seconds, size, "test", "samples=1")
    rng = np.random.default_rng(0)
    speech = Speech.generate(seconds, rng)
    times = np.arange(round(seconds * fps)) / fps
    frames = (render_frame(spec, float(t), float(o), 0.0) for t, o in zip(times, speech.envelope(times)))
    return write_media(path, frames, fps, audio=speech.waveform(RATE, seconds, rng), **kw)


def remux(source: Path, target: Path, edit: Callable[[av.Packet], av.Packet | None]) -> Path:
    """`source`'s streams copied into an mp4 packet by packet, each one through `edit` (which may
    return a replacement with the same timing, or None to drop it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(source)) as reader, av.open(str(target), "w", format="mp4") as output:
        streams = {s.index: output.add_stream_from_template(s) for s in reader.streams}
        for packet in reader.demux():
            index = packet.stream.index
            if packet.size and (packet := edit(packet)) is not None:
                packet.stream = streams[index]
                output.mux(packet)
    return target


def decoded_frames(mp4: bytes) -> tuple[int, Fraction]:
    with av.open(io.BytesIO(mp4)) as container:
        return sum(1 for _ in container.decode(video=0)), container.streams.video[0].average_rate


# ---------------------------------------------------------------- frame rate and size


@pytest.mark.parametrize("fps", [120, 240])
def test_high_frame_rate_sources_are_resampled_to_the_25fps_timeline(tmp_path, fps):
    seconds = 2.0
    face_clip(tmp_path / "in" / "fast.mp4", fps, seconds)
    outcome = ingest(tmp_path / "in")
    assert outcome.rejects == []
    (members,) = outcome.samples.values()
    expected = math.floor(seconds * 25)
    assert json.loads(members["json"])["num_frames"] == expected
    assert decoded_frames(members["mp4"]) == (expected, 25)


@pytest.mark.parametrize("size", [(1, 1), (15, 11), (80, 63)])
def test_frames_below_the_minimum_side_are_rejected_at_probe(tmp_path, size):
    write_media(tmp_path / "in" / "tiny.mp4", plain_frames(10, size), audio=tone(0.4), pix_fmt="yuv444p")
    outcome = ingest(tmp_path / "in")
    assert outcome.reasons() == {"tiny.mp4": "probe/resolution_too_small"}
    assert outcome.detail("tiny.mp4") == f"{size[0]}x{size[1]}; ingest.min_side is 64"


def test_odd_frame_size_above_the_minimum_is_processed(tmp_path):
    # 4:2:0 needs even sizes; odd-sized H.264 is 4:4:4.
    face_clip(tmp_path / "in" / "odd.mp4", size=(321, 241), pix_fmt="yuv444p")
    outcome = ingest(tmp_path / "in")
    assert outcome.rejects == []
    (members,) = outcome.samples.values()
    assert decoded_frames(members["mp4"]) == (50, 25)


def test_variable_frame_rate_timeline_follows_presentation_time(tmp_path):
    """Frames last 1/20 s and 1/40 s in turn, with a 0.3 s hole; each frame's grey level is its
    number, so the frame the 25 fps timeline shows at each tick can be read off the pixels."""
    durations = [2, 1] * 8 + [12] + [2, 1] * 8  # in 1/40 s
    pts = [0, *np.cumsum(durations).tolist()]
    frames = [np.full((64, 64, 3), 20 + 6 * k, np.uint8) for k in range(len(pts))]
    write_media(tmp_path / "in" / "vfr.mp4", frames, 40, pts=pts)
    (tmp_path / "in" / "vfr.wav").write_bytes(encode_wav(tone(2.0), RATE))
    (item,) = list_inputs(str(tmp_path / "in"))
    config = resolve_config(DataJobConfig, [])
    sample = Sample(source=item.video, dataset=item.dataset, key_stem=item.key_stem, audio_source=item.audio)
    sample.video_path, sample.audio_path = item.video, item.audio
    sample = run_stages(sample, [Probe(config.ingest), Resample(config.ingest)], {})
    assert not sample.failed, sample.rejects
    assert sample.num_frames == math.floor((pts[-1] / 40 + 1 / sample.info.fps) * 25)
    reader = VideoFrames(sample.video_path)
    shown = reader.read(cfr_indices(sample.timestamps, 25, 0.0, sample.num_frames))[:, 32, 32, 0]
    reader.close()
    # Frame on screen at tick n: the last one presented at or before n / 25 s.
    expected = [max(k for k, p in enumerate(pts) if p * 25 <= n * 40) for n in range(sample.num_frames)]
    assert np.round((shown.astype(float) - 20) / 6).astype(int).tolist() == expected
    assert expected.count(expected[-1]) == 1 and max(expected.count(k) for k in expected) >= 7  # the hole


# ---------------------------------------------------------------- audio


@pytest.mark.parametrize("share", [1.0, 0.3])
def test_garbled_audio_packets_are_rejected_as_corrupt_audio(tmp_path, share):
    rng = np.random.default_rng(0)

    def garble(packet: av.Packet) -> av.Packet:
        if packet.stream.type != "audio" or rng.random() >= share:
            return packet
        noise = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
        noise.pts, noise.dts, noise.time_base = packet.pts, packet.dts, packet.time_base
        return noise

    clean = write_media(tmp_path / "clean.mp4", plain_frames(50), audio=tone(2.0))
    remux(clean, tmp_path / "in" / "garbled.mp4", garble)
    outcome = ingest(tmp_path / "in")
    assert outcome.reasons() == {"garbled.mp4": "resample/audio_corrupt"}
    assert outcome.detail("garbled.mp4").startswith("audio packet at ")


def test_an_audio_stream_cut_short_is_accepted_for_as_long_as_it_lasts(tmp_path):
    def audio_until_1_4_s(packet: av.Packet) -> av.Packet | None:
        return packet if packet.stream.type == "video" or packet.pts * packet.time_base < 1.4 else None

    cut = remux(face_clip(tmp_path / "full.mp4"), tmp_path / "in" / "cut.mp4", audio_until_1_4_s)
    audio_s = len(read_audio(str(cut), RATE)) / RATE
    assert 1.3 < audio_s < 1.5
    outcome = ingest(tmp_path / "in")
    assert outcome.rejects == []
    (members,) = outcome.samples.values()
    assert json.loads(members["json"])["num_frames"] == math.floor(audio_s * 25)  # not the video's 50


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes(), "probe/audio_unreadable"),
        (encode_wav(tone(2.0), RATE)[:20], "probe/audio_unreadable"),  # the header cut short
        (encode_wav(tone(2.0), RATE)[:44], "resample/zero_length"),  # a header and no samples
    ],
)
def test_a_corrupt_paired_wav_is_rejected(tmp_path, content, reason):
    write_media(tmp_path / "in" / "clip.mp4", plain_frames(50))
    (tmp_path / "in" / "clip.wav").write_bytes(content)
    outcome = ingest(tmp_path / "in")
    assert outcome.reasons() == {"clip.mp4": reason}
    assert "paired audio" in outcome.detail("clip.mp4") or "audio 0.00 s" in outcome.detail("clip.mp4")


def test_an_audio_only_mp4_is_rejected_as_no_video(tmp_path):
    write_media(tmp_path / "in" / "voice.mp4", None, audio=tone(2.0))
    assert ingest(tmp_path / "in").reasons() == {"voice.mp4": "probe/no_video"}


def test_inputs_over_the_duration_cap_are_rejected_at_probe(tmp_path):
    write_media(tmp_path / "in" / "long.mp4", plain_frames(50), audio=tone(2.0))
    outcome = ingest(tmp_path / "in", "ingest.max_duration_s=1.5")
    assert outcome.reasons() == {"long.mp4": "probe/too_long"}
    assert outcome.detail("long.mp4") == "2.0 s; ingest.max_duration_s is 1.5"
    assert ingest(tmp_path / "in", "ingest.max_duration_s=2.5").reasons()["long.mp4"] != "probe/too_long"


def test_read_audio_decodes_into_one_buffer_and_stops_at_max_s(tmp_path):
    seconds, source_rate = 20, 48000
    t = np.arange(seconds * source_rate) / source_rate
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], 1)
    path = tmp_path / "long.wav"
    path.write_bytes(encode_wav(stereo.astype(np.float32), source_rate))
    tracemalloc.start()
    try:
        audio = read_audio(str(path), RATE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(audio) == seconds * RATE and audio.dtype == np.float32
    # Chunks plus their concatenation would peak at 2-3x the result.
    assert peak < 1.25 * audio.nbytes
    spectrum = np.abs(np.fft.rfft(audio))
    assert sorted(np.argsort(spectrum)[-2:] * RATE / len(audio)) == [220, 330]  # both channels, mixed
    prefix = read_audio(str(path), RATE, max_s=1.5)
    np.testing.assert_array_equal(prefix, audio[: round(1.5 * RATE)])


def test_read_audio_keeps_all_of_a_stream_longer_than_it_states(tmp_path):
    """A VBR mp3 without a Xing header states its length from its first frames' bitrate: loud
    first and silent after, it claims about half of it; the buffer grows instead of cutting."""
    noise = np.random.default_rng(0).uniform(-0.8, 0.8, RATE)
    signal = np.concatenate([noise, np.zeros(5 * RATE)]).astype(np.float32)
    path = tmp_path / "vbr.mp3"
    with av.open(str(path), "w", format="mp3", options={"write_xing": "0"}) as output:
        stream = output.add_stream("libmp3lame", rate=RATE, layout="mono")
        stream.codec_context.qscale = True  # variable bitrate
        frame = av.AudioFrame.from_ndarray(signal[None], format="flt", layout="mono")
        frame.sample_rate, frame.pts = RATE, 0
        output.mux(stream.encode(frame))
        output.mux(stream.encode())
    with av.open(str(path)) as container:
        assert container.duration / av.time_base < 4.0
    audio = read_audio(str(path), RATE)
    assert len(audio) >= 6 * RATE
    assert np.abs(audio[: RATE // 2]).mean() > 0.1 and np.abs(audio[2 * RATE :]).max() < 0.01


# ---------------------------------------------------------------- listing


def test_unicode_paths_are_ingested_under_webdataset_safe_keys(tmp_path):
    face_clip(tmp_path / "in" / "données" / "vidéo 说话.mp4")
    outcome = ingest(tmp_path / "in")
    assert outcome.rejects == []
    (key,) = outcome.samples
    assert re.fullmatch(r"vid_o_-[0-9a-f]{8}-000000", key)
    assert json.loads(outcome.samples[key]["json"])["dataset"] == "données"


def test_listed_but_missing_files_are_rejected_at_probe(tmp_path):
    write_media(tmp_path / "clip.mp4", plain_frames(50))
    (tmp_path / "list.csv").write_text("video,audio\nmissing.mp4,\nclip.mp4,missing.wav\n")
    assert [i.problem for i in list_inputs(str(tmp_path / "list.csv"))] == ["", ""]
    outcome = ingest(tmp_path / "list.csv")
    assert outcome.reasons() == {"missing.mp4": "probe/missing_file", "clip.mp4": "probe/missing_file"}
    assert outcome.detail("missing.mp4") == f"video {tmp_path}/missing.mp4 does not exist"
    assert outcome.detail("clip.mp4") == f"paired audio {tmp_path}/missing.wav does not exist"


def test_a_video_listed_twice_is_processed_once_and_reported(tmp_path):
    write_media(tmp_path / "a.mp4", None, audio=tone(1.0))
    write_media(tmp_path / "b.mp4", None, audio=tone(1.0))
    listing = tmp_path / "list.csv"
    listing.write_text(f"video,dataset\na.mp4,first\nb.mp4,\n{tmp_path}/a.mp4,second\n")
    items = list_inputs(str(listing))
    assert [(Path(i.video).name, i.dataset, i.problem) for i in items] == [
        ("a.mp4", "first", ""),
        ("a.mp4", "second", f"duplicate: listed 2 times in {listing}"),
        ("b.mp4", "default", ""),
    ]
    rows = [(Path(r["source"]).name, r["stage"], r["reason"], r["detail"]) for r in ingest(listing).rejects]
    assert rows == [
        ("a.mp4", "probe", "no_video", "no video stream"),
        ("a.mp4", "input", "duplicate", f"listed 2 times in {listing}"),
        ("b.mp4", "probe", "no_video", "no video stream"),
    ]


def test_folder_inputs_take_every_ffmpeg_container_and_report_unknown_files(tmp_path):
    root = tmp_path / "in"
    frames, audio = plain_frames(38), tone(1.5)
    write_media(root / "c.flv", frames, audio=audio, container="flv")
    write_media(root / "c.ts", frames, audio=audio, container="mpegts")
    write_media(root / "c.3gp", frames, audio=audio, container="3gp")
    write_media(root / "c.mpg", frames, audio=audio, container="mpeg", codec="mpeg2video", audio_codec="mp2")
    (root / "c.xyz").write_bytes((root / "c.3gp").read_bytes())  # a video, but nothing says so
    for name in ("README", "notes.txt", "thumb.jpg", ".DS_Store", ".cache/blob"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / "empty").mkdir()
    problems = {Path(i.video).name: i.problem for i in list_inputs(str(root))}
    assert problems == {
        "c.3gp": "", "c.flv": "", "c.mpg": "", "c.ts": "",
        "c.xyz": "unsupported_extension: .xyz is not a video, audio or sidecar extension",
        "README": "unsupported_extension: no extension is not a video, audio or sidecar extension",
    }  # fmt: skip
    # Each container gets through probe, resample and shots to the face detector (no face in it).
    assert ingest(root).reasons() == {
        "c.3gp": "faces/no_face", "c.flv": "faces/no_face", "c.mpg": "faces/no_face", "c.ts": "faces/no_face",
        "c.xyz": "input/unsupported_extension", "README": "input/unsupported_extension",
    }  # fmt: skip


# ---------------------------------------------------------------- config ranges


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("ingest.fps=0", "ingest.fps"),
        ("ingest.sample_rate=0", "ingest.sample_rate"),
        ("ingest.min_segment_s=0", "ingest.min_segment_s"),
        ("ingest.min_segment_s=10.5", "ingest.min_segment_s"),  # above max_segment_s (10)
        ("ingest.shot_width=15", "ingest.shot_width"),
        ("ingest.min_side=0", "ingest.min_side"),
        ("ingest.max_duration_s=0", "ingest.max_duration_s"),
        ("faces.stride=0", "faces.stride"),
        ("faces.detect_size=63", "faces.detect_size"),
        ("faces.max_missing=-0.1", "faces.max_missing"),
        ("faces.max_missing=1.5", "faces.max_missing"),
        ("faces.max_multi_face=1.01", "faces.max_multi_face"),
        ("align.size=30", "align.size"),
        ("align.size=257", "align.size"),
        ("iqa.threshold=-1", "iqa.threshold"),
        ("iqa.threshold=100.5", "iqa.threshold"),
        ("write.crf=-1", "write.crf"),
        ("write.crf=52", "write.crf"),
        ("write.inputs_per_task=0", "write.inputs_per_task"),
        ("write.shard_max_samples=-1", "write.shard_max_samples"),
        ("score.max_offset=-1", "score.max_offset"),
        ("execution.num_cpus_per_task=0", "execution.num_cpus_per_task"),
        ("execution.ingest_num_gpus=-1", "execution.ingest_num_gpus"),
        ("execution.score_num_gpus=-0.5", "execution.score_num_gpus"),
        ("execution.task_attempts=0", "execution.task_attempts"),
        ("execution.max_failure_share=1.5", "execution.max_failure_share"),
        ("split.heldout_fraction=-0.1", "split.heldout_fraction"),
    ],
)
def test_validate_names_the_key_and_its_allowed_values(override, key):
    config = resolve_config(DataJobConfig, [override])
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}' is -?[0-9.]+; allowed values: \w"):
        validate(config)


def test_validate_accepts_the_profiles_and_the_edges_of_each_range():
    for profile in ("tiny", "14b"):
        validate(resolve_config(DataJobConfig, [f"profile={profile}"]))
    edges = ["ingest.min_segment_s=10", "ingest.shot_width=16", "ingest.min_side=1", "faces.stride=1",
             "faces.detect_size=64", "faces.max_missing=0", "faces.max_multi_face=1", "align.size=32",
             "iqa.threshold=100", "write.crf=0", "write.inputs_per_task=1", "write.shard_max_samples=0",
             "score.max_offset=0", "execution.num_cpus_per_task=0.5"]  # fmt: skip
    validate(resolve_config(DataJobConfig, edges))


def test_the_data_job_refuses_an_out_of_range_config_before_any_work(tmp_path):
    output = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        [sys.executable, "-m", "pipelines.data", "write.crf=60", f"output={output}"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert "config key 'write.crf' is 60; allowed values: an integer in 0..51" in run.stderr
    assert not output.exists()
