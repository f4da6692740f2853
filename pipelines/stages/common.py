"""What the three distillation stages share: shard windows, on-the-fly latents, weight hand-off."""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import webdataset as wds
from safetensors.torch import save_file

from lipforcing import storage
from lipforcing.data import FPS, SAMPLE_RATE
from lipforcing.data.encode import EncodedBatch, LatentEncoder, from_records
from lipforcing.data.shards import (
    RAW_FIELDS,
    SkipCounter,
    loaded,
    shard_urls,
    training_samples,
    worker_reader,
)
from lipforcing.data.windows import collate, lower_face_mask, windows
from lipforcing.models.conditioning import Condition
from lipforcing.models.lora import apply_lora, export_state_dict
from lipforcing.models.vae import mask_to_latent
from pipelines.distill_config import DistillConfig
from pipelines.trainer import Stage

WEIGHTS_FILE = "dit.safetensors"
TEXT_FILE = "text.pt"  # written by `make encode` beside the latent shards


def stage_weights(output: str, stage: str) -> str:
    """Where a stage's merged (Wan-layout) weights are written: the next stage's starting point."""
    return storage.join(output, stage, WEIGHTS_FILE)


def given_weights(config: DistillConfig, stage: str) -> str:
    """The configured weights that replace a stage's own training (`teacher.weights`, `student.weights`), or ""."""
    return {"teacher": config.teacher.weights, "student": config.student.weights}.get(stage, "")


def starting_weights(config: DistillConfig, stage: str) -> str:
    """Where the weights a stage hands on are read: the configured ones, else the stage's output."""
    return given_weights(config, stage) or stage_weights(config.output, stage)


class WindowStream(torch.utils.data.IterableDataset):
    """Raw training windows for one rank, batched; each dataloader worker reads its own stream."""

    def __init__(self, config, rank: int, world_size: int, batch_size: int, start: int):
        self.config, self.rank, self.world_size, self.batch_size, self.start = config, rank, world_size, batch_size, start
        self.skips = SkipCounter()

    def __iter__(self):
        config = self.config
        reader = worker_reader(self.rank, self.world_size)
        samples = training_samples(shard_urls(config.data), reader, config.seed, self.start, RAW_FIELDS, self.skips, config.loader.shuffle_buffer)
        seed = hash((config.seed, reader.index, self.start))
        cut = windows(samples, config.window, seed, self.skips, config.model.use_reference_sequence)
        yield from batched(cut, self.batch_size, collate)


class LatentStream(torch.utils.data.IterableDataset):
    """Batches of cached latent records (from `make encode`) for one rank."""

    def __init__(self, config, rank: int, world_size: int, batch_size: int, start: int):
        self.config, self.rank, self.world_size, self.batch_size, self.start = config, rank, world_size, batch_size, start
        self.skips = SkipCounter()

    def __iter__(self):
        config = self.config
        reader = worker_reader(self.rank, self.world_size)
        load = wds.map(load_record, handler=self.skips)
        records = training_samples(
            shard_urls(config.latents), reader, config.seed, self.start, ("pth",), self.skips, config.loader.shuffle_buffer, load
        )
        yield from batched(records, self.batch_size, list)


def load_record(sample: dict) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(sample["pth"]), weights_only=True)


def batched(items: Iterator[Any], size: int, collate_fn: Callable[[list], Any]) -> Iterator[Any]:
    """Consecutive groups of `size` items, each passed through `collate_fn`."""
    while True:
        chunk = list(itertools.islice(items, size))
        if len(chunk) < size:
            return
        yield collate_fn(chunk)


class DiffusionStage(Stage[DistillConfig]):
    """A stage that trains DiTs on encoded windows; subclasses build networks and define the step.

    With `latents` set it reads the `make encode` cache; otherwise it encodes windows on the fly.
    """

    def __init__(self, context):
        super().__init__(context)
        config = context.config
        self._preview: tuple | None = None  # the condition every sample video is rendered from
        self.tae: torch.nn.Module | None = None  # decodes sample videos; built on first use
        if config.latents:
            texts = torch.load(io.BytesIO(storage.read_bytes(storage.join(config.latents, TEXT_FILE))), weights_only=True)
            self.text = texts["text"].to(context.device)
            self.negative_text = texts["negative_text"].to(context.device)
            self.latent_mask = mask_to_latent(lower_face_mask(config.window.size, config.window.mask_box)).to(context.device)
        else:
            self.encoder = LatentEncoder(config.model, config.window, context.device)

    def stream(self, start: int) -> WindowStream | LatentStream:
        config = self.context.config
        kind = LatentStream if config.latents else WindowStream
        return kind(config, self.context.rank, self.context.world_size, self.context.trainer.batch_size, start)

    def batches(self, start: int):
        dataset = self.stream(start)
        self.skips = dataset.skips
        return loaded(dataset, self.context.config.loader)

    def data_metrics(self) -> dict[str, float]:
        return {"data/skipped_samples": float(self.skips.total)}

    def encode(self, batch) -> EncodedBatch:
        if isinstance(batch, list):  # cached records
            encoded = from_records(batch, self.text, self.negative_text, self.latent_mask)
            return EncodedBatch(
                x0=encoded.x0.to(self.context.device),
                cond=encoded.cond.to(self.context.device),
                negative_text=encoded.negative_text,
                audio=encoded.audio.to(self.context.device),
            )
        return self.encoder(batch)

    def weights(self, stage: str) -> str:
        """Local path of an earlier stage's output (or the configured teacher / student)."""
        return storage.cached(starting_weights(self.context.config, stage))

    def student_base(self) -> str | None:
        """Where the student and the fake score start: the teacher when sizes match, else None, the
        profile's own pretrained base (`model.dit_weights`, with `model.dit_adapter` merged on top:
        e.g. OmniAvatar-LS 1.3B under a 14B teacher)."""
        config = self.context.config
        if config.same_size_teacher():
            return self.weights("teacher")
        if not config.model.dit_weights:
            from lipforcing.config import ConfigError

            raise ConfigError(
                "config key 'model.dit_weights' is empty: a student smaller than its teacher starts from a "
                "same-size base checkpoint"
            )
        return None

    def adapt(self, model: torch.nn.Module) -> torch.nn.Module:
        """The stage adapter: fresh LoRA on q,k,v,o,ffn + fully trainable audio and patch modules."""
        cfg = self.context.config.model
        return apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)

    def generate(self, engines, cond: Condition, negative_text: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Clean latents [1, 16, F, h, w] for one sample's condition, as this stage's network makes them."""
        raise NotImplementedError

    @torch.no_grad()
    def render_samples(self, engines, output_dir: str, tag: str) -> None:
        """Rank 0: generate one clip with `generate` and keep it as `samples/<tag>.mp4`.

        The condition (the first sample a rank reads) and the noise are fixed for the whole stage, so
        successive videos differ only by training.
        """
        if self.context.rank != 0:
            return
        from data_jobs.media import encode_mp4, to_uint8
        from lipforcing.models import build_tae

        if self._preview is None:
            encoded = self.encode(next(iter(self.stream(start=0))))
            cond = encoded.cond.frames(0, encoded.x0.shape[2])
            first = type(cond)(**{k: None if v is None else v[:1] for k, v in vars(cond).items()})
            self._preview = (first, encoded.negative_text, encoded.audio[0].cpu().numpy())
        cond, negative_text, audio = self._preview
        generator = torch.Generator(self.context.device).manual_seed(self.context.config.seed)
        latents = self.generate(engines, cond, negative_text, generator)
        if self.tae is None:
            self.tae = build_tae(self.context.config.model).to(self.context.device).eval()
        frames = self.tae.decode(latents.float())
        video = encode_mp4(to_uint8(frames[0].cpu()).numpy(), FPS, crf=18, audio=audio, sample_rate=SAMPLE_RATE)
        os.makedirs(os.path.join(output_dir, "samples"), exist_ok=True)
        with open(os.path.join(output_dir, "samples", f"{tag}.mp4"), "wb") as handle:
            handle.write(video)

    def export(self, module: torch.nn.Module, output_dir: str, stage: str | None = None) -> None:
        """Rank 0 writes merged Wan-layout weights to the run's artifacts and to <output>/<stage>/."""
        if self.context.rank != 0:
            return
        path = os.path.join(output_dir, WEIGHTS_FILE)
        save_file({k: v.contiguous() for k, v in export_state_dict(module).items()}, path)
        storage.upload_file(path, stage_weights(self.context.config.output, stage or self.name))

