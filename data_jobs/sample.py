"""The embedded sample: a small raw talking-head dataset made from face photos that ship in PyPI
packages, for `make demo` and the tests (`python -m data_jobs.sample output=outputs/sample`).

Each clip animates a still face: the mouth opens with the energy of a generated speech-like
signal (syllables with pauses, harmonic voice, consonant bursts), at the exact time of each video
frame, so lip motion and audio are correlated at any frame rate. A slow head sway makes alignment
do real work. Clips vary in fps, audio rate, channel count, size and orientation, and the sample
deliberately includes inputs the data job must reject. `list.csv` names every file with its
dataset tag, identity, split, paired audio, expected outcome and planted audio shift
(`audio_shift_s` > 0: the audio lags the video by that many seconds). The clips of one face
(`HELDOUT_IDENTITIES`) are marked `heldout`, so the job writes an evaluation set as well.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import os
import sys
from dataclasses import dataclass

import cv2
import numpy as np

from data_jobs.media import encode_mp4, encode_wav
from lipforcing import storage

FACE_WIDTH_FRACTION = 0.36  # face box width / shorter frame side
# Held out whole: t1c's long HDTF-tagged clip gives 3 samples; the other faces keep 8 for training.
HELDOUT_IDENTITIES = ("t1c",)


@dataclass(frozen=True)
class ClipSpec:
    name: str
    faces: tuple[str, ...]  # one identity; two = side by side; ("cut", a, b) handled via cut_at_s
    fps: float
    sample_rate: int
    channels: int
    duration_s: float
    size: tuple[int, int]  # width, height
    dataset: str
    expect: str  # "samples=N" or "reject=<stage>/<reason>"
    cut_at_s: float = 0.0  # > 0: hard cut from faces[0] to faces[1]
    audio_shift_s: float = 0.0
    blur_sigma: float = 0.0
    audio_in_container: bool = True
    paired_wav: bool = False


CLIPS = (
    ClipSpec("hdtf_astronaut_25fps", ("astronaut",), 25, 16000, 1, 8.0, (320, 320), "hdtf", "samples=1"),
    ClipSpec("vox_t1a_30fps", ("t1a",), 30, 44100, 2, 13.0, (384, 288), "voxceleb2", "samples=2"),
    ClipSpec("hallo3_t1b_2997fps", ("t1b",), 30000 / 1001, 48000, 2, 6.0, (288, 384), "hallo3", "samples=1"),
    ClipSpec("hdtf_t1c_24fps_long", ("t1c",), 24, 48000, 1, 21.0, (256, 256), "hdtf", "samples=3"),
    ClipSpec(
        "vox_hard_cut",
        ("astronaut", "t1d"),
        25,
        44100,
        1,
        12.5,
        (320, 320),
        "voxceleb2",
        "samples=2",
        cut_at_s=6.0,
    ),
    ClipSpec(
        "vox_offset_0p4s",
        ("t1a",),
        25,
        16000,
        1,
        8.0,
        (320, 320),
        "voxceleb2",
        "samples=1",
        audio_shift_s=0.4,
    ),
    ClipSpec(
        "hdtf_silent_paired_wav",
        ("t1b",),
        25,
        44100,
        2,
        7.0,
        (320, 320),
        "hdtf",
        "samples=1",
        audio_in_container=False,
        paired_wav=True,
    ),  # fmt: skip
    ClipSpec(
        "short_4s", ("astronaut",), 25, 16000, 1, 4.0, (320, 320), "hdtf", "reject=shots/shot_too_short"
    ),
    ClipSpec(
        "bad_no_audio",
        ("t1c",),
        25,
        16000,
        1,
        6.0,
        (320, 320),
        "sample",
        "reject=probe/no_audio",
        audio_in_container=False,
    ),  # fmt: skip
    ClipSpec("bad_no_face", (), 25, 16000, 1, 6.0, (320, 320), "sample", "reject=faces/no_face"),
    ClipSpec(
        "bad_two_faces",
        ("t1a", "t1b"),
        25,
        16000,
        1,
        6.0,
        (512, 288),
        "sample",
        "reject=faces/multiple_faces",
    ),
    ClipSpec(
        "bad_blurred",
        ("astronaut",),
        25,
        16000,
        1,
        6.0,
        (320, 320),
        "sample",
        "reject=iqa/low_quality",
        blur_sigma=3.0,
    ),  # fmt: skip
)
BROKEN_FILES = {
    "bad_truncated": "reject=probe/unreadable",
    "bad_empty": "reject=probe/empty_file",
    "bad_text_named_mp4": "reject=probe/unreadable",
}


def clip_identity(spec: ClipSpec) -> str:
    """The clip's faces ("t1a", side by side or cut: "t1a+t1b"), or its name when it shows none."""
    return "+".join(spec.faces) or spec.name


def clip_split(spec: ClipSpec) -> str:
    """Marked in the list, so the sample's held-out set does not depend on `split.heldout_fraction`."""
    return "heldout" if clip_identity(spec) in HELDOUT_IDENTITIES else "train"


# ---------------------------------------------------------------- speech-like audio


@dataclass
class Speech:
    """Syllables (start, end, f0, loudness) of a generated utterance."""

    syllables: np.ndarray  # (n, 4)

    @classmethod
    def generate(cls, duration_s: float, rng: np.random.Generator) -> Speech:
        syllables, t = [], 0.3
        while t < duration_s - 0.3:
            length = rng.uniform(0.12, 0.26)
            syllables.append((t, min(t + length, duration_s), rng.uniform(100, 220), rng.uniform(0.55, 1.0)))
            t += length + (rng.uniform(0.05, 0.12) if rng.random() < 0.7 else rng.uniform(0.25, 0.55))
        return cls(np.array(syllables))

    def envelope(self, times: np.ndarray) -> np.ndarray:
        """Loudness in [0, 1] at each time: a rounded hump per syllable, silence in between."""
        out = np.zeros_like(times, dtype=np.float64)
        for start, end, _, loudness in self.syllables:
            inside = (times >= start) & (times < end)
            out[inside] = loudness * np.sin(np.pi * (times[inside] - start) / (end - start)) ** 0.7
        return out

    def waveform(self, sample_rate: int, duration_s: float, rng: np.random.Generator) -> np.ndarray:
        times = np.arange(round(duration_s * sample_rate)) / sample_rate
        signal = np.zeros_like(times)
        envelope = self.envelope(times)
        for start, end, f0, _ in self.syllables:
            inside = (times >= start) & (times < end)
            local = times[inside] - start
            pitch = f0 * (1 + 0.05 * np.sin(2 * np.pi * 5 * local))
            phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
            voice = sum(np.sin(k * phase) / k for k in range(1, 9))
            signal[inside] += voice
            burst = inside & (times < start + 0.025)
            signal[burst] += rng.normal(0, 1.5, burst.sum())
        signal = signal * envelope + rng.normal(0, 0.003, len(times))
        return (0.5 * signal / np.abs(signal).max()).astype(np.float32)


# ---------------------------------------------------------------- faces


def _t1_faces() -> dict[str, tuple[np.ndarray, tuple[int, int, int]]]:
    import insightface

    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")
    image = cv2.imread(path)[:, :, ::-1]
    # Face boxes (x, y, width) found by dlib's HOG detector in t1.jpg, the four most confident.
    boxes = {"t1a": (1118, 283, 109), "t1b": (67, 283, 109), "t1c": (724, 367, 109), "t1d": (450, 295, 108)}
    return {name: (image, box) for name, box in boxes.items()}


@functools.cache
def face_photo(name: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(RGB photo, face box (x, y, width)) of an identity."""
    if name == "astronaut":
        from skimage.data import astronaut

        return astronaut(), (175, 76, 91)
    return _t1_faces()[name]


@functools.cache
def _landmark_predictor():
    import dlib

    folder = importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]
    return dlib, dlib.shape_predictor(os.path.join(folder, "models", "shape_predictor_68_face_landmarks.dat"))


@dataclass
class Portrait:
    """A face photo cropped to a frame size, with its mouth geometry."""

    image: np.ndarray
    mouth_centre: np.ndarray
    mouth_width: float
    chin_y: float


@functools.cache
def portrait(name: str, width: int, height: int) -> Portrait:
    photo, (x, y, face) = face_photo(name)
    scale = FACE_WIDTH_FRACTION * min(width, height) / face
    centre = np.array([x + face / 2, y + face * 0.62])
    matrix = np.array([[scale, 0, width / 2 - scale * centre[0]], [0, scale, height / 2 - scale * centre[1]]])
    image = cv2.warpAffine(
        photo, matrix, (width, height), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT
    )
    dlib, predictor = _landmark_predictor()
    left, top = matrix @ np.array([x, y, 1.0])
    size = face * scale
    shape = predictor(
        np.ascontiguousarray(image), dlib.rectangle(int(left), int(top), int(left + size), int(top + size))
    )
    points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
    mouth_centre = points[[48, 54, 62, 66]].mean(0)
    return Portrait(image, mouth_centre, float(np.linalg.norm(points[54] - points[48])), float(points[8, 1]))


def open_mouth(base: Portrait, opening: float) -> np.ndarray:
    """The portrait with the jaw dropped and a dark mouth opening sized by `opening` in [0, 1]."""
    image = base.image.copy()
    drop = opening * 0.3 * base.mouth_width
    if drop < 0.5:
        return image
    cx, cy = base.mouth_centre
    bottom = base.chin_y + 0.3 * base.mouth_width
    x0, x1 = int(cx - 1.1 * base.mouth_width), int(cx + 1.1 * base.mouth_width) + 1
    y0, y1 = int(cy), int(bottom) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, image.shape[1]), min(y1, image.shape[0])
    grid_x, grid_y = np.meshgrid(np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32))
    vertical = np.clip(1 - (grid_y - cy) / max(bottom - cy, 1), 0, 1)
    horizontal = np.cos(np.clip((grid_x - cx) / (1.1 * base.mouth_width), -1, 1) * np.pi / 2)
    source_y = (grid_y - drop * vertical * horizontal).astype(np.float32)
    image[y0:y1, x0:x1] = cv2.remap(
        base.image, grid_x, source_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    axes = (int(0.36 * base.mouth_width * (0.7 + 0.3 * opening)), int(drop * 0.55) + 1)
    cv2.ellipse(image, (int(cx), int(cy + drop * 0.45)), axes, 0, 0, 360, (70, 22, 28), -1, cv2.LINE_AA)
    return image


def sway(image: np.ndarray, t: float, phase: float) -> np.ndarray:
    """Slow head motion: small rotation, zoom and drift."""
    height, width = image.shape[:2]
    angle = 1.5 * np.sin(2 * np.pi * 0.13 * t + phase)
    zoom = 1 + 0.015 * np.sin(2 * np.pi * 0.07 * t + phase)
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, zoom)
    matrix[:, 2] += (4 * np.sin(2 * np.pi * 0.11 * t + phase), 3 * np.sin(2 * np.pi * 0.09 * t))
    return cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )


def render_frame(spec: ClipSpec, t: float, opening: float, phase: float) -> np.ndarray:
    width, height = spec.size
    if not spec.faces:
        return _faceless(width, height, t)
    if len(spec.faces) == 2 and not spec.cut_at_s:
        halves = [
            sway(open_mouth(portrait(f, width // 2, height), opening), t, phase + i)
            for i, f in enumerate(spec.faces)
        ]
        frame = np.hstack(halves)
    else:
        name = spec.faces[1] if spec.cut_at_s and t >= spec.cut_at_s else spec.faces[0]
        frame = sway(open_mouth(portrait(name, width, height), opening), t, phase)
    if spec.blur_sigma:
        frame = cv2.GaussianBlur(frame, (0, 0), spec.blur_sigma)
    return frame


def _faceless(width: int, height: int, t: float) -> np.ndarray:
    """Slowly drifting colour fields: content without faces or cuts."""
    grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    channels = [
        0.5 + 0.4 * np.sin(2 * np.pi * (grid_x * (1 + k) + grid_y * (2 - k) + 0.1 * t + k)) for k in range(3)
    ]
    return (np.stack(channels, -1) * 255).astype(np.uint8)


# ---------------------------------------------------------------- files


def encode_clip(spec: ClipSpec, rng: np.random.Generator) -> tuple[bytes, bytes | None]:
    """(mp4 bytes, paired wav bytes or None) of one clip."""
    speech = Speech.generate(spec.duration_s, rng)
    audio = speech.waveform(spec.sample_rate, spec.duration_s + spec.audio_shift_s, rng)
    shift = round(spec.audio_shift_s * spec.sample_rate)
    audio = np.concatenate([np.zeros(shift, np.float32), audio])[: round(spec.duration_s * spec.sample_rate)]
    audio = np.repeat(audio[:, None], spec.channels, axis=1)
    frame_count = round(spec.duration_s * spec.fps)
    times = np.arange(frame_count) / spec.fps
    openings = speech.envelope(times)
    phase = rng.uniform(0, 2 * np.pi)
    frames = (render_frame(spec, float(t), float(opening), phase) for t, opening in zip(times, openings))
    video = encode_mp4(frames, spec.fps, crf=18, audio=audio if spec.audio_in_container else None, sample_rate=spec.sample_rate)
    return video, encode_wav(audio, spec.sample_rate) if spec.paired_wav else None


def generate_sample(output: str, seed: int = 0) -> str:
    """Write the sample under `output` (any fsspec URL); returns the URL of its `list.csv`."""
    rng = np.random.default_rng(seed)
    rows, first_good = [], None
    for spec in CLIPS:
        video, wav = encode_clip(spec, np.random.default_rng(rng.integers(1 << 31)))
        storage.write_bytes(storage.join(output, "videos", f"{spec.name}.mp4"), video)
        audio = ""
        if wav is not None:
            audio = f"videos/{spec.name}.wav"
            storage.write_bytes(storage.join(output, audio), wav)
        first_good = first_good or video
        rows.append({"video": f"videos/{spec.name}.mp4", "audio": audio, "dataset": spec.dataset,
                     "identity": clip_identity(spec), "split": clip_split(spec), "expect": spec.expect,
                     "audio_shift_s": spec.audio_shift_s, "fps": round(spec.fps, 3),
                     "sample_rate": spec.sample_rate, "channels": spec.channels, "duration_s": spec.duration_s})  # fmt: skip
    broken = {
        "bad_truncated": first_good[: len(first_good) * 2 // 5],
        "bad_empty": b"",
        "bad_text_named_mp4": b"this is a text file, not a video\n" * 20,
    }
    for name, data in broken.items():
        storage.write_bytes(storage.join(output, "videos", f"{name}.mp4"), data)
        rows.append({"video": f"videos/{name}.mp4", "audio": "", "dataset": "sample", "identity": name,
                     "split": "train", "expect": BROKEN_FILES[name],
                     "audio_shift_s": 0.0, "fps": 0, "sample_rate": 0, "channels": 0, "duration_s": 0})  # fmt: skip
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    list_url = storage.join(output, "list.csv")
    storage.write_text(list_url, text.getvalue())
    return list_url


def main(argv: list[str]) -> int:
    options = dict(a.split("=", 1) for a in argv)
    unknown = set(options) - {"output", "seed"}
    if unknown:
        print(f"unknown arguments {sorted(unknown)}; use output=URL seed=N", file=sys.stderr)
        return 2
    print(generate_sample(options.get("output", "outputs/sample"), int(options.get("seed", 0))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
