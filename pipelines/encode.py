"""`make encode`: cache training latents so training GPUs never decode video or run the VAE.

A Ray Data job over the data job's shards: one actor per device holds the frozen encoders (Wan VAE,
wav2vec2, the text embedding) and turns each input shard into a latent shard of the same name
holding `windows_per_clip` training windows per clip (clean and mouth-masked latents, reference
latents, packed audio features, the raw audio for the SyncNet reward). Actors take a GPU each on a
cluster (`num_gpus=1`) and run on CPU locally. A latent shard is uploaded in one atomic write, so
a rerun encodes only the shards that are missing. `make distill ARGS="latents=<output>"` trains from
the cache; without `latents` the stages encode on the fly.
"""

from __future__ import annotations

import io
import logging
import random
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from lipforcing import storage
from lipforcing.config import ClusterConfig, to_yaml
from lipforcing.data.encode import LatentEncoder, to_records
from lipforcing.data.shards import decode_clip, shard_urls
from lipforcing.data.windows import WindowConfig, collate, cut_window
from lipforcing.models.config import ModelConfig
from lipforcing.models.text import text_embeddings
from pipelines.jobs import run_job
from pipelines.stages.common import TEXT_FILE

log = logging.getLogger("lipforcing.encode")


@dataclass
class EncodeConfig:
    profile: str = "tiny"
    data: str = "outputs/data"  # the data job's output
    output: str = "outputs/latents"
    windows_per_clip: int = 4
    batch_size: int = 4  # windows encoded together
    actors: int = 1  # encoder replicas (one per GPU on a cluster)
    num_gpus: float = 0.0  # per actor; 1 on GPU clusters
    num_cpus: float = 1.0  # per actor
    seed: int = 0
    window: WindowConfig = field(default_factory=WindowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)



class ShardEncoder:
    """A Ray Data actor: builds the encoders once, then encodes one input shard per call."""

    def __init__(self, config: EncodeConfig):
        self.config = config
        device = "cuda" if config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.encoder = LatentEncoder(config.model, config.window, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from webdataset import tariterators

        counts = []
        for url in batch["shard"]:
            name = url.rsplit("/", 1)[-1]
            rng = random.Random(f"{self.config.seed}:{name}")
            windows = []
            for sample in tariterators.tarfile_samples([{"url": url}]):
                clip = decode_clip(sample, self.config.window.size)  # scaled by the decoder, as training does
                for _ in range(self.config.windows_per_clip):
                    window = cut_window(clip, self.config.window, rng, self.config.model.use_reference_sequence)
                    if window is not None:
                        windows.append(window)
            records = []
            for start in range(0, len(windows), self.config.batch_size):
                part = windows[start : start + self.config.batch_size]
                for window, record in zip(part, to_records(self.encoder(collate(part)))):
                    records.append((window, record))
            _write_latent_shard(storage.join(self.config.output, "shards", name), records)
            counts.append(len(records))
        return {"shard": batch["shard"], "windows": np.array(counts)}


def _write_latent_shard(url: str, records: list) -> None:
    with tempfile.NamedTemporaryFile(suffix=".tar") as spool:
        with tarfile.open(spool.name, "w") as tar:
            seen: dict[str, int] = {}
            for window, record in records:
                index = seen[window.key] = seen.get(window.key, -1) + 1
                key = f"{window.key}_w{index}"
                payload = io.BytesIO()
                torch.save(record, payload)
                meta = f'{{"key": "{window.key}", "dataset": "{window.dataset}"}}'.encode()
                for extension, data in (("pth", payload.getvalue()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        storage.upload_file(spool.name, url)


def encode(config: EncodeConfig) -> int:
    import ray

    from pipelines.ray_cluster import init_ray

    sources = shard_urls(config.data)
    done = {u.rsplit("/", 1)[-1] for u in storage.glob(storage.join(config.output, "shards", "*.tar"))}
    pending = [u for u in sources if u.rsplit("/", 1)[-1] not in done]
    log.info("encode: %d shards, %d already encoded, %d to encode", len(sources), len(sources) - len(pending), len(pending))
    storage.write_text(storage.join(config.output, "config.yaml"), to_yaml(config))
    text, negative = text_embeddings(config.model)
    buffer = io.BytesIO()
    torch.save({"text": text, "negative_text": negative}, buffer)
    storage.write_bytes(storage.join(config.output, TEXT_FILE), buffer.getvalue())
    if not pending:
        return 0
    init_ray()
    results = (
        ray.data.from_items([{"shard": u} for u in pending])
        .map_batches(
            ShardEncoder,
            fn_constructor_args=(config,),
            batch_size=1,
            concurrency=config.actors,
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
        )
        .take_all()
    )
    log.info("encode: wrote %d windows into %d latent shards", sum(int(r["windows"]) for r in results), len(results))
    return 0


if __name__ == "__main__":
    sys.exit(run_job("pipelines.encode", EncodeConfig, encode))
