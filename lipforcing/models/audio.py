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

    def forward(self, waveform: Tensor, num_frames: int, stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """waveform [B, samples] at 16 kHz -> features [B, num_frames, feature_dim]. The waveform is
        normalised to zero mean, unit variance; `stats` (mean, variance, [B, 1] each) normalise a
        piece of a longer waveform as the whole one."""
        mean, var = (waveform.mean(-1, keepdim=True), waveform.var(-1, keepdim=True)) if stats is None else stats
        x = (waveform - mean) / torch.sqrt(var + 1e-7)

        def to_video_rate(module: nn.Module, args: tuple, conv: Tensor) -> Tensor:
            # 50 Hz conv features [B, C, T] -> one per video frame, before the transformer sees them
            return F.interpolate(conv, size=num_frames, mode="linear", align_corners=True)

        hook = self.wav2vec.feature_extractor.register_forward_hook(to_video_rate)
        try:
            out = self.wav2vec(x, output_hidden_states=True)
        finally:
            hook.remove()
        return torch.cat([out.last_hidden_state, *out.hidden_states], dim=-1)


class WindowedAudioFeatures:
    """The per-frame features of a long waveform, computed a window at a time as they are read.

    wav2vec2 attends over its whole input, so one pass over a 10-minute waveform needs memory
    quadratic in its length. Here each window of `window` frames is run with `context` frames of audio
    on either side (their features dropped), normalised with the whole waveform's statistics. A
    waveform of at most `window` frames is one window: exactly `encoder(waveform, num_frames)`.
    """

    def __init__(self, encoder: AudioEncoder, waveform: Tensor, num_frames: int, window: int = 250, context: int = 50):
        if window < 1 or context < 0:
            raise ValueError(f"window must be >= 1 and context >= 0; got {window}, {context}")
        self.encoder, self.waveform, self.num_frames = encoder, waveform, num_frames
        self.window, self.context = window, context
        self.samples_per_frame = waveform.shape[-1] / num_frames
        self.stats = (waveform.mean(-1, keepdim=True), waveform.var(-1, keepdim=True))
        self.computed = torch.empty(waveform.shape[0], 0, encoder.feature_dim, device=waveform.device)
        self.stop = 0  # frames up to here have been computed (the last window's are in `computed`)

    def _sample(self, frame: int) -> int:
        return round(frame * self.samples_per_frame)

    def _next_window(self) -> Tensor:
        start, stop = self.stop, min(self.stop + self.window, self.num_frames)
        low, high = max(0, start - self.context), min(self.num_frames, stop + self.context)
        piece = self.waveform[..., self._sample(low) : self._sample(high)]
        self.stop = stop
        return self.encoder(piece, high - low, self.stats)[:, start - low : stop - low]

    @torch.no_grad()
    def take(self, count: int) -> Tensor:
        """The next `count` frames' features [B, count, feature_dim]."""
        while self.computed.shape[1] < count:
            if self.stop >= self.num_frames:
                raise ValueError(f"asked for {count} more frames; only {self.computed.shape[1]} of {self.num_frames} are left")
            self.computed = torch.cat([self.computed, self._next_window()], dim=1)
        taken, self.computed = self.computed[:, :count], self.computed[:, count:]
        return taken


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


def pack_audio(features: Tensor, frames_per_latent: int = 4, first: bool = True) -> Tensor:
    """[B, N, C] per-video-frame features -> [B, (N + 3) / 4, 4 * C] rows, one per latent frame.

    The first frame is repeated `frames_per_latent - 1` times, mirroring the VAE's first latent frame
    that encodes a single video frame (81 frames -> 84 -> 21 latent steps). A later chunk of a stream
    (`first=False`) has no such frame: N / 4 rows.
    """
    b, n, c = features.shape
    if (n - first) % frames_per_latent:
        raise ValueError(f"{n} video frames is not {int(first)} + {frames_per_latent} * k")
    if first:
        features = torch.cat([features[:, :1].expand(b, frames_per_latent - 1, c), features], dim=1)
    return features.reshape(b, -1, frames_per_latent * c)


class AudioPack(nn.Module):
    """Linear(4 * C -> 32) + LayerNorm on packed audio (keys `audio_proj.proj`, `audio_proj.norm_out`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)
        self.norm_out = nn.LayerNorm(out_features)

    def forward(self, packed: Tensor) -> Tensor:
        return self.norm_out(self.proj(packed))
