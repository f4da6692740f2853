"""The InsightFace detector backend on generated model packs (see tests/insightface_pack.py).

The stub detector returns planted faces in the 640x640 detector input whatever the image, so these
tests check what our code does around it: loading the pack (local or s3://), undoing InsightFace's
letterbox and our own downscale, and the Faces stage's single-face and multi-face logic.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from data_jobs.config import FacesConfig
from data_jobs.faces import Faces, InsightFaceBackend, face_backend
from data_jobs.media import MediaInfo
from data_jobs.pipeline import Sample
from lipforcing import storage
from tests.insightface_pack import FACE, SECOND_FACE, write_pack

PACK_FILES = ("det_10g.onnx", "w600k_r50.onnx")


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> str:
    return write_pack(tmp_path_factory.mktemp("buffalo_stub"))


def assert_planted(faces, scale: float) -> None:
    """Exactly the planted face, at the planted box and landmarks times `scale`, within 1 px."""
    assert len(faces) == 1
    assert faces[0].score == pytest.approx(FACE.score)
    np.testing.assert_allclose(faces[0].box, np.array(FACE.box) * scale, atol=1.0)
    np.testing.assert_allclose(faces[0].landmarks, np.array(FACE.landmarks) * scale, atol=1.0)


def test_detector_maps_the_face_back_through_the_letterbox(pack):
    # 1280x720 is letterboxed into 640x360 (+ padding): detector coordinates scale by 2
    frame = np.random.default_rng(0).integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    assert_planted(InsightFaceBackend(pack).detect(frame), scale=2.0)


def upload_pack(pack: str, bucket: str) -> str:
    url = f"{bucket}/models/buffalo_l"
    for name in PACK_FILES:
        storage.upload_file(f"{pack}/{name}", f"{url}/{name}")
    return url


@pytest.mark.integration
def test_model_pack_loads_from_s3(pack, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "CACHE", str(tmp_path / "cache"))  # really download, not a stale copy
    url = upload_pack(pack, s3_bucket)
    assert_planted(InsightFaceBackend(url).detect(np.zeros((720, 1280, 3), np.uint8)), scale=2.0)


class RacingDownload:
    """A filesystem on which another worker of the same machine completes each download first."""

    def __init__(self, fs):
        self.fs = fs

    def __getattr__(self, name: str):
        return getattr(self.fs, name)

    def get(self, source: str, partial: str, **kwargs) -> None:
        self.fs.get(source, partial.rsplit(".part-", 1)[0], **kwargs)
        self.fs.get(source, partial, **kwargs)


@pytest.mark.integration
def test_a_pack_another_worker_downloaded_first_is_used(pack, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "CACHE", str(tmp_path / "cache"))
    url = upload_pack(pack, s3_bucket)
    real = storage.filesystem
    monkeypatch.setattr(storage, "filesystem", lambda u: (RacingDownload(real(u)[0]), real(u)[1]))
    folder = storage.cached(url)
    assert sorted(os.listdir(folder)) == list(PACK_FILES)
    assert sorted(os.listdir(os.path.dirname(folder))) == [".lock", "buffalo_l"]  # our partial copy is gone


def tracked(config: FacesConfig, frames: int = 12, width: int = 960, height: int = 540) -> Sample:
    """A segment of grey frames through the face tracker at every `stride`-th frame (what the
    ingest stream does), ready for the Faces stage's judgement."""
    faces = Faces(config)
    tracker = faces.tracker(width, height)
    frame = np.full((height, width, 3), 128, np.uint8)
    detections = [tracker.detect(p, frame) for p in range(0, frames, config.stride)]
    landmarks = np.stack([d.face.landmarks for d in detections if d.face is not None] or [np.zeros((5, 2))])
    info = MediaInfo(has_video=True, has_audio=False, width=width, height=height, fps=25.0)
    return Sample(
        source="clip.mp4",
        dataset="test",
        key_stem="clip",
        info=info,
        num_frames=frames,
        end_frame=frames,
        detections=detections,
        landmarks=landmarks,
    )


def test_faces_stage_tracks_the_planted_landmarks(pack):
    # 960x540 is downscaled to 512x288 for detection, then letterboxed to 640x360: net scale 1.5
    config = FacesConfig(backend="insightface", model_pack=pack)
    sample = Faces(config)(tracked(config))
    assert not sample.failed, sample.rejects
    planted = np.broadcast_to(np.array(FACE.landmarks) * 1.5, (3, 5, 2))
    np.testing.assert_allclose(sample.landmarks, planted, atol=1.0)
    assert sample.face_stats["missing"] == 0 and sample.face_stats["multiple"] == 0
    assert sample.face_stats["checks"] == 3  # SCRFD searches the whole frame every time
    assert sample.face_stats["mean_score"] == pytest.approx(FACE.score)


def test_faces_stage_rejects_two_comparable_faces(tmp_path):
    two_faces = write_pack(tmp_path / "two_faces", faces=(FACE, SECOND_FACE), recognizer=False)
    config = FacesConfig(backend="insightface", model_pack=two_faces)
    sample = Faces(config)(tracked(config))
    assert sample.failed
    assert [(r.stage, r.reason) for r in sample.rejects] == [("faces", "multiple_faces")]


def test_device_argument_loads_on_the_cpu_and_caches(pack):
    backend = face_backend("insightface", pack, "cpu")
    assert backend is face_backend("insightface", pack, "cpu")
    assert_planted(backend.detect(np.zeros((720, 1280, 3), np.uint8)), scale=2.0)


def test_pack_without_a_detector_names_the_config_key(tmp_path):
    (tmp_path / "w600k_r50.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="faces.model_pack") as error:
        InsightFaceBackend(str(tmp_path))
    assert "det*.onnx" in str(error.value)


def test_detector_without_landmarks_is_refused(tmp_path):
    import onnx

    from tests.insightface_pack import detector

    onnx.save(detector((FACE,), keypoints=False), str(tmp_path / "det_10g.onnx"))
    with pytest.raises(ValueError, match="faces.model_pack.*without the 5 landmarks"):
        InsightFaceBackend(str(tmp_path))
