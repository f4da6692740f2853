"""From pixel windows to what the DiT trains on: clean latents and the lip-sync `Condition`.

One encoder serves training on the fly and the `encode` job that caches latents: the Wan VAE
(clean and mouth-masked video, reference frame and sequence), wav2vec2 audio features packed per
latent frame, the fixed text embedding and the mouth mask at latent size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lipforcing.data.windows import WindowConfig, lower_face_mask
from lipforcing.models.audio import AudioEncoder, build_audio_encoder, pack_audio
from lipforcing.models.conditioning import Condition
from lipforcing.models.config import ModelConfig
from lipforcing.models.text import text_embeddings
from lipforcing.models.vae import WanVAE, build_vae, mask_to_latent


@dataclass
class EncodedBatch:
    x0: Tensor  # [B, 16, F, h, w] clean latents
    cond: Condition
    negative_text: Tensor  # [text_len, text_dim] for the CFG null branch
    audio: Tensor  # [B, samples] the raw 16 kHz slice (SyncNet reward, sample videos)


class LatentEncoder:
    """Frozen encoders, built once per worker."""

    def __init__(self, model: ModelConfig, window: WindowConfig, device: torch.device | str = "cpu"):
        self.model, self.window, self.device = model, window, torch.device(device)
        self.vae: WanVAE = build_vae(model, model.vae_weights).to(self.device)
        self.audio_encoder: AudioEncoder = build_audio_encoder(model, model.audio_encoder_weights).to(self.device)
        positive, negative = text_embeddings(model)
        self.text, self.negative_text = positive.to(self.device), negative.to(self.device)
        self.pixel_mask = lower_face_mask(window.size, window.mask_box).to(self.device)

    @torch.no_grad()
    def condition(self, batch: dict) -> Condition:
        """The lip-sync condition of a batch of windows (what inference needs: no clean latent)."""
        video = batch["video"].to(self.device)  # [B, T, 3, S, S] in [0, 1]
        b, frames = video.shape[:2]
        sequence = batch.get("reference_sequence")
        audio = self.audio_encoder(batch["audio"].to(self.device), frames)
        return Condition(
            reference=self.vae.encode(batch["reference"].to(self.device)),
            mask=mask_to_latent(self.pixel_mask).expand(b, -1, -1, -1, -1),
            masked_video=self.vae.encode_masked(video, self.pixel_mask.unsqueeze(1)),
            audio=pack_audio(audio, self.model.audio_frames_per_latent),
            text=self.text.expand(b, -1, -1),
            reference_sequence=None if sequence is None else self.vae.encode(sequence.to(self.device)),
        )

    @torch.no_grad()
    def __call__(self, batch: dict) -> EncodedBatch:
        """Training inputs: the clean latent x0 plus the condition."""
        x0 = self.vae.encode(batch["video"].to(self.device))
        audio = batch["audio"].to(self.device)
        return EncodedBatch(x0=x0, cond=self.condition(batch), negative_text=self.negative_text, audio=audio)


CACHED_FIELDS = ("x0", "reference", "masked_video", "audio_features", "reference_sequence", "audio")


def to_records(encoded: EncodedBatch) -> list[dict[str, Tensor]]:
    """Per-sample tensors of an encoded batch, for the latent cache (text and mask are shared)."""
    cond = encoded.cond
    fields = {
        "x0": encoded.x0,
        "reference": cond.reference,
        "masked_video": cond.masked_video,
        "audio_features": cond.audio,
        "reference_sequence": cond.reference_sequence,
        "audio": encoded.audio,
    }
    return [{k: v[i].detach().cpu().clone() for k, v in fields.items() if v is not None} for i in range(len(encoded.x0))]


def from_records(records: list[dict[str, Tensor]], text: Tensor, negative_text: Tensor, latent_mask: Tensor) -> EncodedBatch:
    """Rebuild a training batch from cached records; `latent_mask` is [1, 1, 1, h, w]."""
    stacked = {k: torch.stack([r[k] for r in records]) for k in CACHED_FIELDS if k in records[0]}
    batch = len(records)
    cond = Condition(
        reference=stacked["reference"],
        mask=latent_mask.expand(batch, -1, -1, -1, -1),
        masked_video=stacked["masked_video"],
        audio=stacked["audio_features"],
        text=text.expand(batch, -1, -1),
        reference_sequence=stacked.get("reference_sequence"),
    )
    return EncodedBatch(x0=stacked["x0"], cond=cond, negative_text=negative_text, audio=stacked["audio"])
