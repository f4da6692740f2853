"""`make syncnet`: train our SyncNet on aligned shards and register it in MLflow as `syncnet`.

Pairs are 50/50: a video window with its own audio (label 1) or with audio from the same clip
shifted by at least one window (label 0); the loss is BCE on the scaled cosine similarity.
Validation reports pair accuracy and the offset-recovery rate: held-out clips get their audio
shifted by known amounts and the SyncNet must find each shift within +-1 frame.
The DMD reward and the metrics read `models:/syncnet@champion` by default, which a new version
replaces only through the promotion gate (`promotion`, pipelines/promotion.py); the data job scores
with the version it trained itself when it had to (pipelines/syncnet_choice.py). Each
registered version is tagged with the lineage of its training data (`lineage.*`), which the data job
checks before it scores other data with it (pipelines/syncnet_choice.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lipforcing import storage
from lipforcing.config import ClusterConfig, to_yaml
from lipforcing.data import FPS
from lipforcing.data.shards import (
    RAW_FIELDS,
    Clip,
    DryStream,
    LoaderConfig,
    SkipCounter,
    check_readable,
    decode_clip,
    loaded,
    shard_urls,
    training_samples,
    worker_reader,
)
from lipforcing.models.syncnet import (
    StableSyncNet,
    SyncModel,
    SyncNetConfig,
    load_syncnet,
    save_syncnet,
    score_clip,
)
from pipelines.jobs import run_job
from pipelines.promotion import Decision, PromotionRule, validate_rule
from pipelines.trainer import Stage, TrainerConfig, fit

REGISTERED_NAME = "syncnet"
SHIFTS_TESTED = (-8, -4, 0, 4, 8)  # frames; validation's planted offsets

log = logging.getLogger("lipforcing.syncnet")


@dataclass
class SyncNetJobConfig:
    profile: str = "tiny"
    data: str = "outputs/data"  # the data job's output (its shards/ folder is read)
    output: str = "outputs/syncnet"  # the trained checkpoint goes to <output>/syncnet.pt
    run_name: str = "syncnet"  # Ray Train run name: a rerun with the same name resumes
    syncnet: SyncNetConfig = field(default_factory=SyncNetConfig)
    train: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(steps=300, batch_size=32, lr=1e-3, zero_stage=2, checkpoint_every=100)
    )
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    pairs_per_clip: int = 32  # pairs drawn from one decoded clip before the next is decoded
    val_fraction: float = 0.2  # share of clips (by key hash) held out for validation
    seed: int = 0
    # When the new SyncNet replaces syncnet@champion (which the data filter, the DMD reward and the
    # metrics read): both scored on this run's held-out clips; the first one becomes champion.
    promotion: PromotionRule = field(
        default_factory=lambda: PromotionRule(tolerances={"val_accuracy": 0.02}, better_any=["offset_recovery_rate", "val_accuracy"], min_gain={})
    )
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def is_validation(key: str, fraction: float) -> bool:
    """Deterministic hold-out by key, the same on every rank and every run."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def clip_pairs(model: StableSyncNet, clip: Clip, count: int, rng: random.Random) -> Iterator[tuple]:
    """(video window, audio window, label) triples; negatives shift the audio by >= one window."""
    video, audio = model.video_windows(torch.from_numpy(clip.frames)), model.audio_windows(clip.audio)
    windows = min(len(video), len(audio))
    if windows < 2 * model.window + 1:
        return
    for _ in range(count):
        i = rng.randrange(windows)
        if rng.random() < 0.5:
            yield video[i], audio[i], 1.0
            continue
        j = rng.choice([j for j in range(windows) if abs(j - i) >= model.window])
        yield video[i], audio[j], 0.0


class PairStream(torch.utils.data.IterableDataset):
    """Endless batches of training pairs for one rank (each dataloader worker reads its own stream)."""

    def __init__(self, config: SyncNetJobConfig, rank: int, world_size: int, start: int):
        self.config, self.rank, self.world_size, self.start = config, rank, world_size, start
        self.windowing = StableSyncNet(config.syncnet)  # only its (parameter-free) window functions are used
        self.skips = SkipCounter()

    def __iter__(self):
        config = self.config
        reader = worker_reader(self.rank, self.world_size)
        rng = random.Random(hash((config.seed, reader.index, self.start)))
        urls = shard_urls(config.data)
        samples = training_samples(urls, reader, config.seed, self.start, RAW_FIELDS, self.skips, config.loader.shuffle_buffer)
        dry = DryStream(f"training pair (val_fraction={config.val_fraction}, clips of >= {2 * self.windowing.window + 1} windows)")
        pending: list[tuple] = []
        batch = config.train.batch_size
        for sample in samples:
            pairs = []
            if not is_validation(sample["__key__"], config.val_fraction):
                try:
                    pairs = list(clip_pairs(self.windowing, decode_clip(sample), config.pairs_per_clip, rng))
                except Exception as error:  # noqa: BLE001 - an undecodable sample is skipped and counted
                    self.skips(error)
            if not pairs:
                dry.unused()
                continue
            dry.used()
            pending.extend(pairs)
            rng.shuffle(pending)
            while len(pending) >= batch:
                chunk, pending = pending[:batch], pending[batch:]
                video, sound, label = zip(*chunk)
                yield torch.stack(video), torch.stack(sound), torch.tensor(label)


class SyncNetStage(Stage[SyncNetJobConfig]):
    name = "syncnet"

    def networks(self):
        torch.manual_seed(self.context.config.seed)
        return {"syncnet": StableSyncNet(self.context.config.syncnet)}

    def batches(self, start):
        dataset = PairStream(self.context.config, self.context.rank, self.context.world_size, start)
        self.skips = dataset.skips
        return loaded(dataset, self.context.config.loader)

    def data_metrics(self):
        return {"data/skipped_samples": float(self.skips.total)}

    def step(self, engines, batch, iteration, micro):
        video, sound, label = (t.to(self.context.device) for t in batch)
        engine = engines["syncnet"]
        logits = engine(video, sound)
        loss = F.binary_cross_entropy_with_logits(logits.float(), label.float())
        engine.backward(loss)
        accuracy = ((logits > 0).float() == label).float().mean()
        return {"loss": loss.item(), "train_accuracy": accuracy.item()}

    def finish(self, engines, output_dir):
        if self.context.rank != 0:
            return {}
        model: StableSyncNet = engines["syncnet"].module
        model.eval()
        metrics = held_out_metrics(model, self.context.config)
        save_syncnet(model, storage.join(output_dir, "syncnet.pt"))
        save_syncnet(model, storage.join(self.context.config.output, "syncnet.pt"))
        return metrics


@torch.no_grad()
def held_out_metrics(model: SyncModel, config: SyncNetJobConfig) -> dict[str, float]:
    """Pair accuracy and offset recovery on held-out clips (all clips when none is held out)."""
    from lipforcing.data.shards import Reader, epoch_samples

    samples = list(epoch_samples(shard_urls(config.data), Reader(), seed=config.seed, epoch=0))
    held_out = [s for s in samples if is_validation(s["__key__"], config.val_fraction)]
    clips = [decode_clip(s) for s in (held_out or samples)]
    rng = random.Random(config.seed)
    correct = total = recovered = trials = 0
    for clip in clips:
        pairs = list(clip_pairs(model, clip, 64, rng))
        if pairs and isinstance(model, StableSyncNet):  # the public syncnet_v2 has no pair classifier
            video, sound, label = (torch.stack([torch.as_tensor(p[k]) for p in pairs]) for k in range(3))
            correct += int(((model.sync_logits(video, sound) > 0).float() == label).sum())
            total += len(pairs)
        frame_samples = clip.sample_rate // FPS
        for shift in SHIFTS_TESTED:
            shifted = np.roll(clip.audio, shift * frame_samples)  # audio delayed by `shift` frames
            found = score_clip(model, torch.from_numpy(clip.frames), shifted).offset
            recovered += int(abs(found - (-shift)) <= 1)
            trials += 1
    metrics = {"offset_recovery_rate": recovered / max(trials, 1), "val_clips": float(len(clips)), "val_is_train": float(not held_out)}
    if total:
        metrics["val_accuracy"] = correct / total
    return metrics


def gate(config: SyncNetJobConfig, run_id: str, version: int) -> Decision:
    """Score the current `syncnet@champion` on the held-out clips the new version was validated on,
    and apply `config.promotion` (the new version is `@challenger` whatever the outcome)."""
    import tempfile

    from pipelines import tracking
    from pipelines.promotion import current_champion, decide, record

    keys = ("val_accuracy", "offset_recovery_rate")
    measured = tracking.mlflow.get_run(run_id).data.metrics
    challenger = {k: measured[k] for k in keys if k in measured}
    champion_version = current_champion(REGISTERED_NAME)
    champion = None
    if champion_version:
        with tempfile.TemporaryDirectory(prefix="lipforcing-syncnet-champion-") as scratch:
            weights, _ = tracking.resolve_model(f"models:/{REGISTERED_NAME}/{champion_version}", scratch, "syncnet")
            scores = held_out_metrics(load_syncnet(SyncNetConfig(weights=weights), key="syncnet").eval(), config)
        champion = {k: scores[k] for k in keys if k in scores}
    rule = config.promotion
    if champion is not None:  # the public syncnet_v2 layout has no pair classifier: no pair accuracy to hold it to
        rule = dataclasses.replace(rule, tolerances={k: v for k, v in rule.tolerances.items() if k in champion})
    decision = decide(challenger, champion, rule)
    record(decision, REGISTERED_NAME, version, champion_version)
    log.info("syncnet version %s %s as @champion: %s", version, decision.verdict, decision.reason)
    return decision


def train_and_register(config: SyncNetJobConfig) -> int:
    """Train on `config.data`, register the checkpoint as `syncnet@challenger` and promote it to
    `@champion` when `config.promotion` says so (`gate`); returns its version. The version carries the lineage of its training data as tags (and the run as params), so
    the data job can tell a SyncNet of the data it scores from one trained on something else."""
    from pipelines import tracking
    from pipelines.lineage import data_lineage, log_dataset
    from pipelines.ray_cluster import init_ray
    from pipelines.syncnet_model import log_syncnet

    check_readable(config.data, RAW_FIELDS, "data")
    trained_on = data_lineage(config.data)
    lineage = trained_on.tags()
    init_ray()
    storage.write_text(storage.join(config.output, "config.yaml"), to_yaml(config))
    with tracking.start_run("syncnet", config=config, tags={"job": "syncnet"}) as run:
        tracking.mlflow.log_params(lineage)
        log_dataset(trained_on, "training")
        result = fit(
            SyncNetStage,
            config,
            config.train,
            run_name=config.run_name,
            output=config.output,
            run_id=run.info.run_id,
            tracking_uri=tracking.mlflow.get_tracking_uri(),
        )
        if result.error is not None:
            raise result.error
        version = log_syncnet(run.info.run_id, "syncnet.pt", REGISTERED_NAME, lineage)
        log.info("registered models:/%s/%s, trained on %s", REGISTERED_NAME, version, lineage)
        gate(config, run.info.run_id, version)
    return version


def validate(config: SyncNetJobConfig) -> None:
    validate_rule(config.promotion, "promotion")
    check_readable(config.data, RAW_FIELDS, "data")


def main(config: SyncNetJobConfig) -> int:
    train_and_register(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_job("pipelines.syncnet", SyncNetJobConfig, main, validate=validate))
