"""Audio conditioning: wav2vec2 features per video frame, and the Audio Pack that feeds the DiT.

Path of the signal (OmniAvatar recipe): 16 kHz waveform -> wav2vec2 conv features interpolated to
the video frame count (25 fps) -> transformer -> last hidden state + all hidden states concatenated
(14 x 768 = 10752 per frame for wav2vec2-base) -> 4 video frames packed per latent frame (first frame
repeated 3 times, 81 -> 84 -> 21) -> Linear + LayerNorm to 32 -> per-block Linear(32 -> dim) added
to the hidden states before blocks 2..L/2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipforcing import storage
from lipforcing.models.config import ModelConfig, resolve_config
from lipforcing.models.seeding import seeded

if TYPE_CHECKING:
    from transformers import Wav2Vec2Model



class AudioEncoder(nn.Module):
    """wav2vec2 wrapper returning one feature row per video frame."""

    def __init__(self, wav2vec: Wav2Vec2Model):
        super().__init__()
        self.wav2vec = wav2vec

    @property
    def feature_dim(self) -> int:
        cfg = self.wav2vec.config
        return (cfg.num_hidden_layers + 2) * cfg.hidden_size

    def forward(self, waveform: Tensor, num_frames: int) -> Tensor:
        """waveform [B, samples] at 16 kHz -> features [B, num_frames, feature_dim]."""
        x = (waveform - waveform.mean(-1, keepdim=True)) / torch.sqrt(waveform.var(-1, keepdim=True) + 1e-7)

        def to_video_rate(module: nn.Module, args: tuple, conv: Tensor) -> Tensor:
            # 50 Hz conv features [B, C, T] -> one per video frame, before the transformer sees them
            return F.interpolate(conv, size=num_frames, mode="linear", align_corners=True)

        hook = self.wav2vec.feature_extractor.register_forward_hook(to_video_rate)
        try:
            out = self.wav2vec(x, output_hidden_states=True)
        finally:
            hook.remove()
        return torch.cat([out.last_hidden_state, *out.hidden_states], dim=-1)


def build_audio_encoder(profile: str | ModelConfig = "tiny", path: str | None = None) -> AudioEncoder:
    """wav2vec2-base-960h from a folder, local or a URL (`path`, else cfg.audio_encoder_weights), or with no
    path a tiny random wav2vec2 of the same code."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model  # heavy: only when an encoder is wanted

    cfg = resolve_config(profile)
    path = cfg.audio_encoder_weights if path is None else path
    if path:
        if not storage.exists(path):
            raise FileNotFoundError(f"audio encoder weights not found: {path} (model.audio_encoder_weights)")
        wav2vec = Wav2Vec2Model.from_pretrained(storage.cached(path), local_files_only=True)
    else:
        with seeded(cfg.seed):
            wav2vec = Wav2Vec2Model(
                Wav2Vec2Config(
                    hidden_size=cfg.audio_encoder_hidden,
                    num_hidden_layers=cfg.audio_encoder_layers,
                    num_attention_heads=2,
                    intermediate_size=2 * cfg.audio_encoder_hidden,
                    conv_dim=(16,) * 7,  # same strides as the real model: 320 samples per conv frame
                    num_conv_pos_embeddings=16,
                    num_conv_pos_embedding_groups=2,
                )
            )
    encoder = AudioEncoder(wav2vec.eval())
    if encoder.feature_dim != cfg.audio_feature_dim:
        raise ValueError(
            f"audio encoder gives {encoder.feature_dim} features per frame but the {cfg.profile} profile "
            f"expects {cfg.audio_feature_dim}"
        )
    return encoder


def pack_audio(features: Tensor, frames_per_latent: int = 4) -> Tensor:
    """[B, N, C] per-video-frame features -> [B, (N + 3) / 4, 4 * C] rows, one per latent frame.

    The first frame is repeated `frames_per_latent - 1` times, mirroring the VAE's first latent frame
    that encodes a single video frame (81 frames -> 84 -> 21 latent steps).
    """
    b, n, c = features.shape
    if (n - 1) % frames_per_latent:
        raise ValueError(f"{n} video frames is not 1 + {frames_per_latent} * k")
    first = features[:, :1].expand(b, frames_per_latent - 1, c)
    return torch.cat([first, features], dim=1).reshape(b, -1, frames_per_latent * c)


class AudioPack(nn.Module):
    """Linear(4 * C -> 32) + LayerNorm on packed audio (keys `audio_proj.proj`, `audio_proj.norm_out`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)
        self.norm_out = nn.LayerNorm(out_features)

    def forward(self, packed: Tensor) -> Tensor:
        return self.norm_out(self.proj(packed))
