"""Transform 4: one face per segment, tracked with 5 landmarks per frame, smoothed over time.

The detector runs every `stride` frames on a copy downscaled to `detect_size`; in between, the
face box is interpolated and (dlib) the landmark predictor refines it on every frame, or
(InsightFace, whose detector returns landmarks) the landmarks are interpolated. Landmarks are
then Gaussian-smoothed along time so the aligned crop does not shake.

Landmark order everywhere is InsightFace's: left eye, right eye, nose tip, left mouth corner,
right mouth corner (left/right as seen in the image).

dlib mapping: the 68-point predictor from `face-recognition-models` gives real mouth corners, so
we use it rather than the 5-point one (eye corners + the point under the nose, which would leave
the mouth to be guessed): eye = mean of the six eye-contour points (36-41, 42-47), nose tip = 30,
mouth corners = 48 and 54.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from data_jobs.config import FacesConfig
from data_jobs.media import VideoFrames
from data_jobs.pipeline import Sample, Transform, chunked
from lipforcing import storage

CHUNK_FRAMES = 64


@dataclass
class Face:
    box: np.ndarray  # x0, y0, x1, y1
    score: float
    landmarks: np.ndarray | None = None  # (5, 2)

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


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
        """dlib's HOG and shape predictor work on grey levels; keeping grey frames costs a third."""
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

    def __init__(self, model_pack: str):
        from insightface.model_zoo import get_model

        storage.require(model_pack, "faces.model_pack")
        folder = storage.cached(model_pack)
        detectors = sorted(f for f in os.listdir(folder) if f.startswith("det") and f.endswith(".onnx"))
        if not detectors:
            raise FileNotFoundError(f"faces.model_pack={model_pack!r} holds no det*.onnx detector")
        self._model = get_model(os.path.join(folder, detectors[0]), providers=["CPUExecutionProvider"])
        if not getattr(self._model, "use_kps", False):
            raise ValueError(
                f"faces.model_pack={model_pack!r}: {detectors[0]} gives boxes without the 5 landmarks the "
                "alignment needs; use a keypoint SCRFD detector such as buffalo_l's det_10g.onnx"
            )
        self._model.prepare(ctx_id=-1, input_size=(640, 640), det_thresh=0.5)

    @staticmethod
    def prepare(frame: np.ndarray) -> np.ndarray:
        return frame

    def detect(self, image: np.ndarray) -> list[Face]:
        boxes, points = self._model.detect(np.ascontiguousarray(image[:, :, ::-1]), input_size=(640, 640))
        return [Face(b[:4].astype(float), float(b[4]), p.astype(float)) for b, p in zip(boxes, points)]


@functools.cache
def face_backend(name: str, model_pack: str = ""):
    """One loaded backend per worker process (Ray reuses processes across tasks)."""
    if name == "insightface":
        return InsightFaceBackend(model_pack)
    return DlibBackend()


def interpolate_gaps(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill rows where `known` is False by linear interpolation along axis 0 (edges held)."""
    positions = np.arange(len(values))
    flat = values.reshape(len(values), -1).astype(np.float64)
    filled = np.stack([np.interp(positions, positions[known], column[known]) for column in flat.T], axis=1)
    return filled.reshape(values.shape)


def smooth_landmarks(landmarks: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing along time; edges use the nearest value so the ends don't drift."""
    return gaussian_filter1d(landmarks, sigma, axis=0, mode="nearest") if sigma > 0 else landmarks


class Faces(Transform):
    name = "faces"

    def __init__(self, config: FacesConfig):
        self.config = config

    def __call__(self, sample: Sample) -> Sample:
        config = self.config
        backend = face_backend(config.backend, config.model_pack)
        indices = sample.source_indices()
        count = len(indices)
        detect_at = np.unique(np.r_[np.arange(0, count, max(1, config.stride)), count - 1])
        width, height = sample.info.width, sample.info.height
        scale = min(1.0, config.detect_size / max(width, height))
        size = (max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2))
        scale_xy = np.array([size[0] / width, size[1] / height])
        reader = VideoFrames(sample.video_path, width=size[0], height=size[1])
        try:
            detections, images = self._scan(reader, backend, indices, detect_at)
        finally:
            reader.close()
        main = [d[0] if d else None for d in detections]
        found = np.array([m is not None for m in main])
        missing = int((~found).sum())
        multi = sum(self._has_second_face(d) for d in detections)
        stats = {
            "detections": int(len(detect_at)),
            "missing": missing,
            "multiple": int(multi),
            "mean_score": float(np.mean([m.score for m in main if m is not None])) if found.any() else 0.0,
        }
        sample.face_stats = stats
        if not found.any():
            return sample.fail(self.name, "no_face", f"no face in {len(detect_at)} detection frames")
        if missing / len(detect_at) > config.max_missing:
            return sample.fail(
                self.name, "face_missing", f"face missing in {missing}/{len(detect_at)} detection frames"
            )
        if multi / len(detect_at) > config.max_multi_face:
            return sample.fail(
                self.name,
                "multiple_faces",
                f"a comparable second face in {multi}/{len(detect_at)} frames",
            )
        boxes = np.zeros((count, 4))
        boxes[detect_at[found]] = [m.box for m in main if m is not None]
        known = np.zeros(count, bool)
        known[detect_at[found]] = True
        boxes = interpolate_gaps(boxes, known)
        if backend.refines:
            landmarks = np.stack([backend.refine(image, box) for image, box in zip(images, boxes)])
        else:
            landmarks = np.zeros((count, 5, 2))
            landmarks[detect_at[found]] = [m.landmarks for m in main if m is not None]
            landmarks = interpolate_gaps(landmarks, known)
        raw = landmarks / scale_xy
        sample.landmarks = smooth_landmarks(raw, config.smooth_sigma)
        eye_distance = np.linalg.norm(sample.landmarks[:, 1] - sample.landmarks[:, 0], axis=1)
        stats["eye_distance_px"] = float(eye_distance.mean())
        stats["jitter_px"] = float(np.abs(np.diff(raw, axis=0)).mean()) if count > 1 else 0.0
        return sample

    def _scan(
        self, reader: VideoFrames, backend, indices: np.ndarray, detect_at: np.ndarray
    ) -> tuple[list[list[Face]], list[np.ndarray]]:
        """One decode pass: faces above `min_score` at each detection frame (largest first), and
        every frame in the backend's working form when it refines landmarks per frame."""
        detect_set, detections, images = set(detect_at.tolist()), [], []
        for positions in chunked(np.arange(len(indices)), CHUNK_FRAMES):
            for position, frame in zip(positions, reader.read(indices[positions])):
                image = backend.prepare(frame)
                if position in detect_set:
                    faces = [f for f in backend.detect(image) if f.score >= self.config.min_score]
                    detections.append(sorted(faces, key=lambda f: f.area, reverse=True))
                if backend.refines:
                    images.append(image)
        return detections, images

    def _has_second_face(self, faces: list[Face]) -> bool:
        return len(faces) > 1 and faces[1].area >= self.config.second_face_ratio * faces[0].area
