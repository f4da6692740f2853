"""CSIM on the generated ArcFace-layout recognition model (see tests/insightface_pack.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lipforcing.metrics.csim import IdentityEmbedder, csim
from tests.insightface_pack import EMBEDDING, write_pack


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> IdentityEmbedder:
    return IdentityEmbedder(write_pack(tmp_path_factory.mktemp("buffalo_stub")), "csim_model_pack")


def faces(seed: int, frames: int = 5, size: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def test_the_pack_recognition_model_is_found_beside_the_detector(embedder):
    assert embedder.model.input_size == (112, 112)
    embeddings = embedder.embed(faces(0, frames=3, size=64))  # upscaled crops work too
    assert embeddings.shape == (3, EMBEDDING)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-6)


def test_identical_sequences_score_one_and_different_ones_less(embedder):
    source = faces(0)
    assert csim(embedder, source, source.copy()) == pytest.approx(1.0, abs=1e-5)
    assert csim(embedder, source, faces(1)) < 0.9
    assert csim(embedder, source[:1], np.repeat(source[:1], 4, axis=0)) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="2 source frames for 5"):
        csim(embedder, source[:2], source)


def test_a_pack_without_a_recognition_model_names_the_config_key(tmp_path):
    folder = write_pack(tmp_path / "detector_only", recognizer=False)
    with pytest.raises(FileNotFoundError, match="'csim_model_pack'.*no ArcFace recognition model"):
        IdentityEmbedder(folder, "csim_model_pack")
