"""Transform 4: one face per segment, tracked with 5 landmarks per frame, smoothed over time.

Frames stream past once (see `data_jobs/ingest.py`). Every `stride` frames of a shot the tracker
looks for the face: in a region around the last box, scaled so the face is a comfortable size for
the detector (cheap, and small faces get upscaled), or in the whole frame to acquire the face, to
re-acquire it after misses and every `check_every` detections to look for a comparable second
face. The whole-frame scale follows from the frame and `min_face_size`: dlib's HOG sees faces of
about `DLIB_MIN_FACE` px, so a frame is scaled by DLIB_MIN_FACE / min_face_size (up when needed)
to acquire (after cheaper coarser passes, which suffice when the face is large), and only as fine
as a comparable second face needs when checking. The landmark
predictor (dlib) runs at detection frames only; frames in between are interpolated, then the
landmarks are Gaussian-smoothed along time so the aligned crop does not shake. InsightFace's
SCRFD returns landmarks with each box and letterboxes its input itself, so it searches the whole
frame (downscaled to `detect_size`) at every detection frame.

Landmark order everywhere is InsightFace's: left eye, right eye, nose tip, left mouth corner,
right mouth corner (left/right as seen in the image).

dlib mapping: the 68-point predictor from `face-recognition-models` gives real mouth corners, so
we use it rather than the 5-point one (eye corners + the point under the nose, which would leave
the mouth to be guessed): eye = mean of the six eye-contour points (36-41, 42-47), nose tip = 30,
mouth corners = 48 and 54.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import math
import os
from dataclasses import dataclass

import cv2
import numpy as np

from data_jobs.config import FacesConfig
from data_jobs.pipeline import Sample, Transform
from lipforcing import storage

DLIB_MIN_FACE = 80  # px: the HOG detector's 80x80 window
TRACK_FACE = 90  # px: face width in the region search (the predictor runs on the same image)
TRACK_MARGIN = 0.35  # region = last box grown by this many box widths on every side
ACQUIRE_COARSE = (4, 2)  # acquisition tries the whole frame this many times coarser first
TRACK_MISSES = 2  # region misses in a row before the tracker searches the whole frame again


@dataclass
class Face:
    box: np.ndarray  # x0, y0, x1, y1
    score: float
    landmarks: np.ndarray | None = None  # (5, 2)

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))

    def mapped(self, scale: float, offset: np.ndarray) -> Face:
        """The face in source pixels, from an image scaled by `scale` after cropping at `offset`."""
        landmarks = None if self.landmarks is None else self.landmarks / scale + offset
        return Face(self.box / scale + np.tile(offset, 2), self.score, landmarks)


class DlibBackend:
    """HOG detector (no model file) + the 68-point predictor shipped in face-recognition-models."""

    refines = True

    def __init__(self):
        import dlib

        folder = importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(
            os.path.join(folder, "models", "shape_predictor_68_face_landmarks.dat")
        )

    @staticmethod
    def prepare(frame: np.ndarray) -> np.ndarray:
        """dlib's HOG and shape predictor work on grey levels; converting only what is searched."""
        return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)

    def detect(self, image: np.ndarray) -> list[Face]:
        rects, scores, _ = self._detector.run(np.ascontiguousarray(image), 0, 0.0)
        return [
            Face(np.array([r.left(), r.top(), r.right(), r.bottom()], float), float(s))
            for r, s in zip(rects, scores)
        ]

    def refine(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        rect = self._dlib.rectangle(*(int(round(v)) for v in box))
        shape = self._predictor(np.ascontiguousarray(image), rect)
        points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])


class InsightFaceBackend:
    """The detector of an InsightFace model pack (buffalo_l's det_10g.onnx: SCRFD, 5 landmarks)."""

    refines = False

    def __init__(self, model_pack: str, device: str = "cpu"):
        from insightface.model_zoo import get_model

        storage.require(model_pack, "faces.model_pack")
        folder = storage.cached(model_pack)
        detectors = sorted(f for f in os.listdir(folder) if f.startswith("det") and f.endswith(".onnx"))
        if not detectors:
            raise FileNotFoundError(f"faces.model_pack={model_pack!r} holds no det*.onnx detector")
        cuda = device.startswith("cuda")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self._model = get_model(os.path.join(folder, detectors[0]), providers=providers)
        if not getattr(self._model, "use_kps", False):
            raise ValueError(
                f"faces.model_pack={model_pack!r}: {detectors[0]} gives boxes without the 5 landmarks the "
                "alignment needs; use a keypoint SCRFD detector such as buffalo_l's det_10g.onnx"
            )
        self._model.prepare(ctx_id=0 if cuda else -1, input_size=(640, 640), det_thresh=0.5)

    @staticmethod
    def prepare(frame: np.ndarray) -> np.ndarray:
        return frame

    def detect(self, image: np.ndarray) -> list[Face]:
        boxes, points = self._model.detect(np.ascontiguousarray(image[:, :, ::-1]), input_size=(640, 640))
        return [Face(b[:4].astype(float), float(b[4]), p.astype(float)) for b, p in zip(boxes, points)]


@functools.cache
def face_backend(name: str, model_pack: str = "", device: str = "cpu"):
    """One loaded backend per worker process (Ray reuses processes across tasks). `device` places
    InsightFace on CUDA ("cuda"); dlib runs on the CPU whatever it says."""
    if name == "insightface":
        return InsightFaceBackend(model_pack, device)
    return DlibBackend()


@dataclass
class Detection:
    """What the tracker saw at one detection frame (boxes and landmarks in source pixels)."""

    position: int
    face: Face | None
    checked: bool  # the whole frame was searched, so a second face could have been seen
    multiple: bool


class FaceTracker:
    """Finds the main face at detection frames of one input; `reset` at each new shot."""

    def __init__(self, config: FacesConfig, backend, width: int, height: int):
        self.config, self.backend, self.width, self.height = config, backend, width, height
        if backend.refines:
            self.acquire_scale = DLIB_MIN_FACE / config.min_face_size
        else:  # SCRFD letterboxes into its own 640 px input; a larger copy would only cost more
            self.acquire_scale = min(1.0, config.detect_size / max(width, height))
        self.reset()

    def reset(self) -> None:
        self.box: np.ndarray | None = None
        self.misses = 0
        self.since_check = 0

    def detect(self, position: int, frame: np.ndarray) -> Detection:
        """Look for the face in `frame` (RGB, source size) and update the track."""
        tracking = self.backend.refines and self.box is not None
        if tracking and self.since_check < self.config.check_every - 1:
            self.since_check += 1
            faces = self._search(frame, self._region(self.box), TRACK_FACE / self._width(self.box))
            checked = False
        elif tracking:  # only as fine as a comparable second face needs
            faces = self._search(frame, self._whole, min(self.acquire_scale, self._check_scale(self.box)))
            self.since_check, checked = 0, True
        else:
            faces = self._acquire(frame)
            self.since_check, checked = 0, True
        main = faces[0] if faces else None
        if main is None:
            self.misses += 1
            if self.misses >= TRACK_MISSES:
                self.box = None
        else:
            self.box, self.misses = main.box, 0
        multiple = checked and len(faces) > 1 and faces[1].area >= self.config.second_face_ratio * faces[0].area
        return Detection(position, main, checked, multiple)

    def _acquire(self, frame: np.ndarray) -> list[Face]:
        """Whole-frame search for a face, coarse to fine (dlib): the fine scale sees faces down to
        `min_face_size` but costs most on large frames, while most faces are far larger. A coarser
        pass that finds a face is kept when it also sees any comparable second face (so the result
        matches the fine search's); otherwise the next finer scale is searched."""
        fine = self.acquire_scale
        if self.backend.refines:
            for factor in ACQUIRE_COARSE:
                faces = self._search(frame, self._whole, fine / factor)
                if faces and fine / factor >= self._check_scale(faces[0].box):
                    return faces
        return self._search(frame, self._whole, fine)

    @property
    def _whole(self) -> tuple[int, int, int, int]:
        return 0, 0, self.width, self.height

    def _check_scale(self, box: np.ndarray) -> float:
        """The coarsest scale at which a face `second_face_ratio` of this box's area is seen."""
        return DLIB_MIN_FACE / (math.sqrt(self.config.second_face_ratio) * self._width(box))

    @staticmethod
    def _width(box: np.ndarray) -> float:
        return max(1.0, float(box[2] - box[0]))

    def _region(self, box: np.ndarray) -> tuple[int, int, int, int]:
        margin = TRACK_MARGIN * self._width(box)
        x0, y0 = max(0, int(box[0] - margin)), max(0, int(box[1] - margin))
        x1, y1 = min(self.width, int(math.ceil(box[2] + margin))), min(self.height, int(math.ceil(box[3] + margin)))
        return x0, y0, max(x1, x0 + 2), max(y1, y0 + 2)

    def _crop(self, frame: np.ndarray, region: tuple[int, int, int, int], scale: float) -> np.ndarray:
        x0, y0, x1, y1 = region
        size = (max(2, round((x1 - x0) * scale)), max(2, round((y1 - y0) * scale)))
        crop = frame[y0:y1, x0:x1]
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        return self.backend.prepare(cv2.resize(crop, size, interpolation=interpolation))

    def _search(self, frame: np.ndarray, region: tuple[int, int, int, int], scale: float) -> list[Face]:
        """Faces above `min_score` in a region of the frame seen at `scale`, largest first, in
        source pixels; the largest gets the predictor's landmarks (dlib) from the same image,
        where it is at least the detector's 80 px wide."""
        image = self._crop(frame, region, scale)
        faces = [f for f in self.backend.detect(image) if f.score >= self.config.min_score]
        faces.sort(key=lambda f: f.area, reverse=True)
        if faces and self.backend.refines:
            faces[0].landmarks = self.backend.refine(image, faces[0].box)
        scale_x = image.shape[1] / (region[2] - region[0])  # the rounded size's exact scale
        return [f.mapped(scale_x, np.array(region[:2], float)) for f in faces]


class LandmarkTrack:
    """The landmarks of one shot as detections arrive: linear between found faces, held at the ends,
    then Gaussian-smoothed along time (scipy's `gaussian_filter1d`, mode nearest, on the
    whole shot, one frame at a time as soon as its window is known)."""

    def __init__(self, start: int, sigma: float):
        self.start, self.sigma = start, sigma
        self.radius = int(4.0 * sigma + 0.5) if sigma > 0 else 0
        offsets = np.arange(-self.radius, self.radius + 1)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2) if sigma > 0 else np.ones(1)
        self.offsets, self.kernel = offsets, kernel / kernel.sum()
        self._at: list[int] = []
        self._points: list[np.ndarray] = []
        self._raw: dict[int, np.ndarray] = {}  # interpolated frames whose next face is known

    @property
    def empty(self) -> bool:
        return not self._at

    def add(self, position: int, landmarks: np.ndarray) -> None:
        self._at.append(position)
        self._points.append(landmarks)

    def raw(self, position: int) -> np.ndarray:
        """Landmarks at `position` before smoothing (held after the last face found so far)."""
        if position in self._raw:
            return self._raw[position]
        after = bisect.bisect_left(self._at, position)
        if after == len(self._at):
            return self._points[-1]
        if after == 0 or self._at[after] == position:
            value = self._points[after]
        else:
            a, b = self._at[after - 1], self._at[after]
            weight = (position - a) / (b - a)
            value = (1 - weight) * self._points[after - 1] + weight * self._points[after]
        self._raw[position] = value
        return value

    def smoothed(self, position: int, end: int) -> np.ndarray:
        """Smoothed landmarks at `position` of a shot known up to `end` (exclusive; the edge holds)."""
        window = np.clip(position + self.offsets, self.start, end - 1)
        return np.tensordot(self.kernel, np.stack([self.raw(int(p)) for p in window]), axes=1)

    def forget_before(self, position: int) -> None:
        """Drop found faces no frame from `position` on needs (keeps memory flat on long shots)."""
        keep = max(0, bisect.bisect_right(self._at, position - self.radius) - 1)
        del self._at[:keep], self._points[:keep]
        self._raw = {p: v for p, v in self._raw.items() if p >= position - self.radius}


class Faces(Transform):
    """Judges a segment from its detections: a face, seen often enough, and alone."""

    name = "faces"

    def __init__(self, config: FacesConfig, device: str = "cpu"):
        self.config, self.device = config, device

    def tracker(self, width: int, height: int) -> FaceTracker:
        backend = face_backend(self.config.backend, self.config.model_pack, self.device)
        return FaceTracker(self.config, backend, width, height)

    def __call__(self, sample: Sample) -> Sample:
        config, detections = self.config, sample.detections
        found = [d.face for d in detections if d.face is not None]
        checks = sum(d.checked for d in detections)
        multi = sum(d.multiple for d in detections)
        missing = len(detections) - len(found)
        stats = sample.face_stats = {
            "detections": len(detections),
            "missing": missing,
            "multiple": int(multi),
            "checks": int(checks),
            "mean_score": float(np.mean([f.score for f in found])) if found else 0.0,
        }
        if not found:
            return sample.fail(self.name, "no_face", f"no face in {len(detections)} detection frames")
        if sample.landmarks is None:
            return sample.fail(self.name, "face_missing", "no face found in time for the first frames of the shot")
        if missing / len(detections) > config.max_missing:
            return sample.fail(
                self.name, "face_missing", f"face missing in {missing}/{len(detections)} detection frames"
            )
        if checks and multi / checks > config.max_multi_face:
            return sample.fail(
                self.name, "multiple_faces", f"a comparable second face in {multi}/{checks} whole-frame searches"
            )
        eye_distance = np.linalg.norm(sample.landmarks[:, 1] - sample.landmarks[:, 0], axis=1)
        stats["eye_distance_px"] = float(eye_distance.mean())
        # Mean per-frame landmark motion before smoothing: linear between found faces, so each
        # gap's total motion is the step between its two detections.
        steps = [np.abs(b.landmarks - a.landmarks).mean() for a, b in zip(found, found[1:])]
        stats["jitter_px"] = float(sum(steps) / max(1, len(sample.landmarks) - 1))
        return sample
