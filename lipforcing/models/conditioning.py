"""The lip-sync condition: everything the DiT sees besides the noisy latent and the timestep."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from lipforcing.models.config import ModelConfig


@dataclass
class Condition:
    """Latent-space conditioning for V2V lip-sync (layouts are batch-first, channels before frames).

    reference:          [B, 16, F or 1, h, w] reference-frame latent (F == 1 broadcasts over time)
    mask:               [B, 1, F or 1, h, w] mouth mask at latent size, 1 = keep, 0 = regenerate
    masked_video:       [B, 16, F, h, w] latent of the source video with the mouth region masked
    audio:              [B, F, 4 * feature_dim] packed audio features, one row per latent frame
    text:               [B, text_len, text_dim] fixed text embedding (padded to text_len)
    reference_sequence: [B, 16, F, h, w] optional extra reference clip latent (65-channel models)
    """

    reference: Tensor
    mask: Tensor
    masked_video: Tensor
    audio: Tensor
    text: Tensor
    reference_sequence: Tensor | None = None

    def channels(self, num_frames: int) -> Tensor:
        """The conditioning input channels, in the checkpoint's order, broadcast to num_frames:
        reference (16), mask (1), masked video (16) [, reference sequence (16)].

        The mask channel is `1 - mask`: 1 where the mouth is generated, 0 where the frame is kept (the
        OmniAvatar convention the released weights were trained with), while `mask` itself keeps the
        LatentSync convention (1 = keep). The one place the two meet.
        """
        parts = [self.reference, 1 - self.mask, self.masked_video]
        if self.reference_sequence is not None:
            parts.append(self.reference_sequence)
        return torch.cat([p.expand(-1, -1, num_frames, -1, -1) for p in parts], dim=1)

    def frames(self, start: int, stop: int) -> Condition:
        """The condition for latent frames [start, stop) (used chunk by chunk when streaming)."""

        def cut(t: Tensor | None, dim: int) -> Tensor | None:
            if t is None or t.shape[dim] == 1:
                return t
            return t.narrow(dim, start, stop - start)

        return Condition(
            reference=cut(self.reference, 2),
            mask=cut(self.mask, 2),
            masked_video=cut(self.masked_video, 2),
            audio=cut(self.audio, 1),
            text=self.text,
            reference_sequence=cut(self.reference_sequence, 2),
        )

    def null(self, negative_text: Tensor) -> Condition:
        """The unconditional branch for CFG: zero audio and the negative text; video inputs unchanged."""
        return Condition(
            reference=self.reference,
            mask=self.mask,
            masked_video=self.masked_video,
            audio=torch.zeros_like(self.audio),
            text=negative_text.expand_as(self.text),
            reference_sequence=self.reference_sequence,
        )

    @staticmethod
    def cat(conditions: list[Condition]) -> Condition:
        """Stack conditions along the batch (e.g. conditional + unconditional for one CFG call)."""
        values = {}
        for f in fields(Condition):
            items = [getattr(c, f.name) for c in conditions]
            values[f.name] = None if items[0] is None else torch.cat(items, dim=0)
        return Condition(**values)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Condition:
        values = {f.name: getattr(self, f.name) for f in fields(Condition)}
        return Condition(**{k: None if v is None else v.to(device, dtype) for k, v in values.items()})


def random_condition(
    cfg: ModelConfig,
    batch: int,
    frames: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
) -> Condition:
    """A random condition of the right shapes for a latent clip [B, 16, frames, height, width].

    For tests and benchmarks only: a lower-half mouth mask, N(0, 1) latents, audio and text.
    """
    c = cfg.latent_channels

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator)

    mask = torch.ones(batch, 1, 1, height, width)
    mask[..., height // 2 :, :] = 0
    return Condition(
        reference=randn(batch, c, 1, height, width),
        mask=mask,
        masked_video=randn(batch, c, frames, height, width),
        audio=randn(batch, frames, cfg.audio_frames_per_latent * cfg.audio_feature_dim),
        text=randn(batch, cfg.text_len, cfg.text_dim),
        reference_sequence=randn(batch, c, frames, height, width) if cfg.use_reference_sequence else None,
    )
