"""Decode and encode helpers: frame-exact reads with decord (PyAV when decord can't open a file),
audio through PyAV's resampler, H.264 mp4 and PCM wav encoding in memory.

Inputs on object storage are copied to a local temporary file first (`storage.temporary_local`):
both decoders want a path, and one sequential download is cheaper than many ranged reads.
"""

from __future__ import annotations

import io
import itertools
import math
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, BinaryIO

import av
import cv2
import numpy as np
import soundfile

from lipforcing.data import SAMPLE_RATE

if TYPE_CHECKING:  # torch is imported by the callers that pass tensors; ingest workers start without it
    import torch


@dataclass
class MediaInfo:
    has_video: bool
    has_audio: bool
    width: int = 0
    height: int = 0
    fps: float = 0.0
    duration_s: float = 0.0
    audio_rate: int = 0
    audio_channels: int = 0


def probe_media(path: str) -> MediaInfo:
    """Stream layout of a media file; raises on files FFmpeg cannot open."""
    with av.open(path) as container:
        videos, audios = container.streams.video, container.streams.audio
        info = MediaInfo(has_video=bool(videos), has_audio=bool(audios))
        container_duration = (container.duration or 0) / av.time_base
        if audios:
            stream = audios[0]
            info.audio_rate = stream.codec_context.sample_rate or 0
            info.audio_channels = stream.codec_context.channels or 0
            info.duration_s = container_duration
        if videos:
            stream = videos[0]
            info.width, info.height = stream.codec_context.width, stream.codec_context.height
            info.fps = float(stream.average_rate or stream.guessed_rate or 0)
            stream_duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
            info.duration_s = stream_duration or container_duration
    return info


# FFmpeg's colour-space codes that mean BT.601 (unspecified decodes as BT.601 too) and its limited range.
BT601_SPACES = (2, 5, 6)  # unspecified, BT470BG, SMPTE170M
LIMITED_RANGES = (0, 1)  # unspecified, MPEG


def rgb_array(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as RGB uint8 (h, w, 3). The common case (yuv420p, BT.601 or untagged,
    limited range, even size) is converted by OpenCV, several times cheaper than swscale's
    conversion on these CPUs and the same matrix; everything else (BT.709 tags, full range, other
    pixel formats) goes through FFmpeg, which honours the frame's tags."""
    if (
        frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0
        and frame.colorspace in BT601_SPACES and frame.color_range in LIMITED_RANGES
    ):  # fmt: skip
        return cv2.cvtColor(frame.to_ndarray(format="yuv420p"), cv2.COLOR_YUV2RGB_I420)
    return frame.to_ndarray(format="rgb24")


def yuv420_frame(image: np.ndarray) -> av.VideoFrame:
    """An RGB uint8 image as the encoder's yuv420p frame (BT.601, limited range: what swscale
    makes of an untagged rgb24 frame), converted by OpenCV; odd sizes go through FFmpeg."""
    if image.shape[0] % 2 or image.shape[1] % 2:
        return av.VideoFrame.from_ndarray(image, format="rgb24")
    return av.VideoFrame.from_ndarray(cv2.cvtColor(image, cv2.COLOR_RGB2YUV_I420), format="yuv420p")


class VideoFrames:
    """Random access to the frames of one video, by source frame index, in bounded chunks."""

    def __init__(self, path: str, width: int = -1, height: int = -1):
        self.path, self.width, self.height = path, width, height
        self._decord = None
        self._pyav_position: tuple[av.container.InputContainer, Iterator[av.VideoFrame], int] | None = None
        self._last: np.ndarray | None = None
        try:
            import decord

            self._decord = decord.VideoReader(
                path, ctx=decord.cpu(0), width=width, height=height, num_threads=1
            )
        except Exception:  # decord rejects some containers PyAV reads; fall back below
            self._decord = None

    def timestamps(self) -> np.ndarray:
        """Presentation start time of every frame, in seconds, ascending."""
        if self._decord is not None:
            return np.asarray(self._decord.get_frame_timestamp(range(len(self._decord))))[:, 0]
        with av.open(self.path) as container:
            stream = container.streams.video[0]
            start, time_base = stream.start_time or 0, float(stream.time_base)  # read before closing
            pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None)
        return (np.asarray(pts, dtype=np.float64) - start) * time_base

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """RGB frames (n, h, w, 3) uint8 for ascending source indices (repeats allowed)."""
        if self._decord is not None:
            return self._decord.get_batch(list(indices)).asnumpy()
        return np.stack([self._pyav_frame(i) for i in indices])

    def close(self) -> None:
        self._decord = None
        if self._pyav_position is not None:
            self._pyav_position[0].close()
            self._pyav_position = None

    def _pyav_frame(self, index: int) -> np.ndarray:
        """Sequential decode; restarts from the beginning when asked to go backwards."""
        if self._pyav_position is None or index < self._pyav_position[2] - 1:
            self.close()
            container = av.open(self.path)
            container.streams.video[0].thread_type = "AUTO"
            self._pyav_position = (container, iter(container.decode(video=0)), 0)
        container, frames, next_index = self._pyav_position
        while next_index <= index:
            self._last = rgb_array(next(frames))
            next_index += 1
        self._pyav_position = (container, frames, next_index)
        frame = self._last
        if self.width > 0 and self.height > 0:
            frame = cv2.resize(frame, (self.width, self.height), interpolation=cv2.INTER_AREA)
        return frame


def cfr_indices(timestamps: np.ndarray, fps: float, start_s: float, num_frames: int) -> np.ndarray:
    """Source frame shown at each tick of a constant-rate timeline (the frame on screen at t)."""
    ticks = start_s + np.arange(num_frames) / fps
    index = np.searchsorted(timestamps, ticks + 1e-6, side="right") - 1
    return np.clip(index, 0, len(timestamps) - 1)


def timeline_frames(path: str, indices: np.ndarray, ahead: int = 8, timestamps: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """RGB frames (h, w, 3) uint8 for ascending source `indices` (from `cfr_indices`), in one
    sequential decode: each source frame is decoded once and converted only if shown; a repeated
    index yields the same array again; a stream shorter than the index map repeats its last frame.
    With the source's frame `timestamps` (`VideoFrames.timestamps`), the decode starts at the
    keyframe before the first index instead of the file's start (a clip deep into a long video).
    A helper thread decodes up to `ahead` frames ahead (FFmpeg runs without the GIL), so decoding
    overlaps the caller's work while memory stays a few frames."""
    queued: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                queued.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def decode() -> None:
        try:
            for image in _decode_timeline(path, indices, timestamps):
                if not put(image):
                    return
            put(None)
        except Exception as err:  # handed to the consumer, raised there
            put(err)

    helper = threading.Thread(target=decode, name="timeline-decode", daemon=True)
    helper.start()
    try:
        while (item := queued.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
        helper.join()


def _decode_timeline(path: str, indices: np.ndarray, timestamps: np.ndarray | None = None) -> Iterator[np.ndarray]:
    decoded = _numbered_frames(path, timestamps, int(indices[0]) if len(indices) else 0)
    try:
        position, frame, image = -1, None, None
        for index in indices:
            while position < index:
                following = next(decoded, None)
                if following is None:
                    break
                (position, frame), image = following, None
            if frame is None:
                raise ValueError(f"{path}: no decodable video frames")
            if image is None:
                image = rgb_array(frame)
            yield image
    finally:
        decoded.close()


def _numbered_frames(path: str, timestamps: np.ndarray | None, first: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """(source index, frame) in order: from the keyframe at or before `first` when the timestamps
    allow a seek, else from the start."""
    if timestamps is not None and first > 0:
        with av.open(path) as container:
            landed = _seek(container, container.streams.video[0], timestamps, first)
            if landed is not None:
                yield from landed
                return
    with av.open(path) as container:
        yield from enumerate(container.decode(video=0))


def _seek(container: av.container.InputContainer, stream: av.video.stream.VideoStream, timestamps: np.ndarray,
          index: int) -> Iterator[tuple[int, av.VideoFrame]] | None:  # fmt: skip
    """(source index, frame) pairs from the keyframe at or before frame `index`, each frame's index read
    from its timestamp; None when the container cannot land there (no timestamps, or past the frame)."""
    start, time_base = stream.start_time or 0, stream.time_base
    container.seek(start + int(timestamps[index] / time_base), stream=stream, backward=True)
    frames = container.decode(stream)
    first = next(frames, None)
    if first is None or first.pts is None:
        return None
    at = nearest_index(timestamps, float((first.pts - start) * time_base))
    if at > index:
        return None

    def numbered() -> Iterator[tuple[int, av.VideoFrame]]:
        yield at, first
        for following in frames:
            if following.pts is None:
                return
            yield nearest_index(timestamps, float((following.pts - start) * time_base)), following

    return numbered()


def nearest_index(timestamps: np.ndarray, seconds: float) -> int:
    """The index of the timestamp closest to `seconds` (ascending `timestamps`)."""
    i = int(np.searchsorted(timestamps, seconds))
    if i == len(timestamps) or (i > 0 and seconds - timestamps[i - 1] < timestamps[i] - seconds):
        i -= 1
    return i


class AudioDecodeError(ValueError):
    """An audio packet FFmpeg cannot decode (a corrupt stream, not a missing one)."""


def read_audio(path: str, sample_rate: int, max_s: float = 0.0) -> np.ndarray:
    """The first audio stream as float32 mono at `sample_rate` (PyAV's resampler, any layout), at
    most its first `max_s` seconds when > 0. Decodes into one buffer sized from the stream's
    duration, so peak memory is the result itself, not chunks plus their concatenation."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    limit = math.ceil(max_s * sample_rate) if max_s > 0 else None
    with av.open(path) as container:
        stream = container.streams.audio[0]
        stated = (container.duration or 0) / av.time_base
        stated = stream.duration * stream.time_base if stream.duration else stated
        # A little over the stated length: codecs pad their last frame and durations are estimates.
        size = math.ceil(float(stated) * sample_rate) + 4096
        buffer = np.empty(min(size, limit) if limit else size, np.float32)
        filled = 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as err:
                at = float(packet.pts * packet.time_base) if packet.pts is not None else float("nan")
                raise AudioDecodeError(f"audio packet at {at:.2f} s: {err}") from err
            for frame in frames:
                for out in resampler.resample(frame):
                    buffer, filled = _append(buffer, filled, out.to_ndarray().reshape(-1), limit)
            if limit is not None and filled >= limit:
                break
        else:
            for out in resampler.resample(None):
                buffer, filled = _append(buffer, filled, out.to_ndarray().reshape(-1), limit)
    # A view, unless the stated duration was far too long and the view would pin unused memory.
    return buffer[:filled] if filled > len(buffer) // 2 else buffer[:filled].copy()


def _append(buffer: np.ndarray, filled: int, chunk: np.ndarray, limit: int | None) -> tuple[np.ndarray, int]:
    """Copy `chunk` in at `filled`, growing the buffer only when the stated duration was short."""
    if limit is not None:
        chunk = chunk[: limit - filled]
    if filled + len(chunk) > len(buffer):
        grown = np.empty(max(filled + len(chunk), len(buffer) + len(buffer) // 2), np.float32)
        grown[:filled] = buffer[:filled]
        buffer = grown
    buffer[filled : filled + len(chunk)] = chunk
    return buffer, filled + len(chunk)


def encode_mp4(
    frames: Iterable[np.ndarray],
    fps: float,
    crf: int = 20,
    preset: str = "veryfast",
    audio: np.ndarray | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> bytes:
    """`write_mp4` into memory: the bytes of the file. The one mp4 writer of shards, the sample
    generator, eval and training sample videos."""
    buffer = io.BytesIO()
    write_mp4(buffer, frames, fps, crf, preset, audio, sample_rate)
    return buffer.getvalue()


def write_mp4(
    target: BinaryIO,
    frames: Iterable[np.ndarray],
    fps: float,
    crf: int = 20,
    preset: str = "veryfast",
    audio: np.ndarray | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> None:
    """H.264 (yuv420p) mp4 of RGB uint8 frames [H, W, 3] into a seekable binary file; with `audio`
    (float in [-1, 1], [samples] or [samples, channels]) an AAC track too. Frames may be a generator:
    memory stays one frame plus the encoder's, whatever the length."""
    frames = iter(frames)
    first = next(frames)
    with av.open(target, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = first.shape[1], first.shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        stream.codec_context.thread_count = 1
        if audio is not None:  # every stream is declared before the first packet is written
            audio = audio if audio.ndim == 2 else audio[:, None]
            sound = container.add_stream("aac", rate=sample_rate, layout="stereo" if audio.shape[1] == 2 else "mono")
        for frame in itertools.chain([first], frames):
            for packet in stream.encode(yuv420_frame(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            _mux_audio(container, sound, audio, sample_rate)


def _mux_audio(container: av.container.OutputContainer, stream: av.audio.AudioStream, audio: np.ndarray, sample_rate: int) -> None:
    """Float audio [samples, channels] into its AAC stream, in 1024-sample frames."""
    layout = stream.layout.name
    step = 1024
    for start in range(0, len(audio), step):
        chunk = np.ascontiguousarray(audio[start : start + step].T, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = sample_rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[T, 3, H, W] in [0, 1] -> [T, H, W, 3] uint8 (what SyncNet and the video encoder read)."""
    return (frames.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).contiguous()


def encode_wav(audio: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
