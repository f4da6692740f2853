"""`make encode`: latent shards made by Ray Data actors, and training batches read back from them."""

from __future__ import annotations

import io
import random

import pytest
import torch

from lipforcing import storage
from lipforcing.data.encode import LatentEncoder
from lipforcing.data.shards import Reader, decode_clip, epoch_samples, shard_urls
from lipforcing.data.windows import collate, cut_window
from pipelines.distill_config import DistillConfig
from pipelines.encode import EncodeConfig, encode
from pipelines.jobs import resolve_config
from pipelines.stages.common import DiffusionStage
from pipelines.trainer import TrainerConfig, WorkerContext

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def latents(sample_shards, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("latents"))
    config = resolve_config(EncodeConfig, [f"data={sample_shards}", f"output={output}", "windows_per_clip=1"])
    assert encode(config) == 0
    return config


def test_every_shard_is_encoded_and_matches_on_the_fly_encoding(latents, sample_shards):
    sources = shard_urls(sample_shards)
    encoded = shard_urls(latents.output)
    assert [u.rsplit("/", 1)[-1] for u in encoded] == [u.rsplit("/", 1)[-1] for u in sources]

    first = sources[0]
    rng = random.Random(f"{latents.seed}:{first.rsplit('/', 1)[-1]}")
    sample = next(epoch_samples([first], Reader(), 0, 0))
    window = cut_window(decode_clip(sample, latents.window.size), latents.window, rng)
    expected = LatentEncoder(latents.model, latents.window)(collate([window]))
    cached = next(epoch_samples([encoded[0]], Reader(), 0, 0))
    record = torch.load(io.BytesIO(cached["pth"]), weights_only=True)
    assert torch.allclose(record["x0"], expected.x0[0], atol=1e-5)
    assert torch.allclose(record["audio_features"], expected.cond.audio[0], atol=1e-5)


def test_rerun_encodes_nothing_new(latents, caplog):
    stamp = {u: storage.filesystem(u)[0].info(storage.filesystem(u)[1])["mtime"] for u in shard_urls(latents.output)}
    with caplog.at_level("INFO", logger="lipforcing.encode"):
        assert encode(latents) == 0
    assert f"{len(stamp)} already encoded, 0 to encode" in caplog.text
    assert stamp == {u: storage.filesystem(u)[0].info(storage.filesystem(u)[1])["mtime"] for u in shard_urls(latents.output)}


def test_training_batches_come_from_the_cache(latents, sample_shards):
    config = resolve_config(DistillConfig, [f"data={sample_shards}", f"latents={latents.output}"])
    trainer = TrainerConfig(batch_size=2)
    context = WorkerContext(0, 1, 0, torch.device("cpu"), config, trainer, None, None)

    class Probe(DiffusionStage):
        name = "probe"

        def networks(self):
            return {}

        def step(self, engines, batch, iteration):
            return {}

    stage = Probe(context)
    assert not hasattr(stage, "encoder")  # no VAE or wav2vec2 built when training from the cache
    batch = stage.encode(next(stage.batches(0)))
    frames = (config.window.frames - 1) // 4 + 1
    assert batch.x0.shape == (2, 16, frames, config.window.size // 8, config.window.size // 8)
    assert batch.cond.audio.shape[:2] == (2, frames)
    assert batch.cond.mask.shape == (2, 1, 1, config.window.size // 8, config.window.size // 8)
    assert batch.cond.text.shape[0] == 2
