"""The Wan 2.1 VAE (diffusers `AutoencoderKLWan`) in the DiT's latent space.

Pixel videos in our API are [B, T, 3, H, W] floats in [0, 1] (frame-major, like the decoders' output);
latents are [B, 16, F, H / 8, W / 8], normalised per channel with the VAE config's latents_mean /
latents_std, which is the space the DiT works in. 81 frames -> 21 latent frames (first frame alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from torch import Tensor, nn

from lipforcing import storage
from lipforcing.models.config import ModelConfig, resolve_config
from lipforcing.models.seeding import seeded


class WanVAE(nn.Module):
    def __init__(self, vae: AutoencoderKLWan):
        super().__init__()
        self.vae = vae
        shape = (1, -1, 1, 1, 1)
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(vae.config.latents_std).view(shape), persistent=False)

    def encode(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] in [0, 1] (T = 4k + 1) -> normalised latents (posterior mean)."""
        x = video.transpose(1, 2) * 2 - 1
        mu = self.vae.encode(x).latent_dist.mode()
        return (mu - self.mean.to(mu)) / self.std.to(mu)

    def encode_masked(self, video: Tensor, mask: Tensor) -> Tensor:
        """Latent of the mouth-masked video; mask [B, 1 or T, 1, H, W], 1 = keep, 0 = regenerate.

        Masked pixels become 0 in the VAE's [-1, 1] range (mid-grey) on every frame before encoding.
        """
        return self.encode((video - 0.5) * mask + 0.5)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, 16, F, h, w] -> video [B, 4F - 3, 3, 8h, 8w] in [0, 1]."""
        z = latents * self.std.to(latents) + self.mean.to(latents)
        return (self.vae.decode(z).sample.transpose(1, 2) + 1) / 2

    def stream_encoder(self) -> VAEStreamEncoder:
        return VAEStreamEncoder(self)

    def stream_decoder(self) -> VAEStreamDecoder:
        return VAEStreamDecoder(self)


class VAEStreamEncoder:
    """Chunk-by-chunk encoding with the causal-conv cache kept between calls: the first call takes
    1 + 4k frames, every later one 4k, and the latents equal those of encoding the clip whole (the
    first frame alone, then four at a time, as diffusers does). The cache is this object's own list,
    so encoders and decoders of one VAE stream side by side."""

    def __init__(self, vae: WanVAE):
        self.wan = vae
        self.reset()

    def reset(self) -> None:
        self.cache: list = [None] * self.wan.vae._cached_conv_counts["encoder"]
        self.first = True

    def encode(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] in [0, 1] -> normalised latents [B, 16, T / 4 (+1 on the first call), h, w]."""
        vae, frames = self.wan.vae, video.shape[1]
        if (frames - self.first) % 4:
            raise ValueError(f"a VAE stream takes 1 + 4k frames first, then 4k; got {frames}")
        x = video.transpose(1, 2) * 2 - 1
        groups = ([x[:, :, :1]] if self.first else []) + list(x[:, :, int(self.first) :].split(4, dim=2))
        out = []
        for group in groups:
            out.append(vae.encoder(group, feat_cache=self.cache, feat_idx=[0]))
        self.first = False
        mu = vae.quant_conv(torch.cat(out, dim=2))[:, : self.wan.mean.shape[1]]  # the posterior mean
        return (mu - self.wan.mean.to(mu)) / self.wan.std.to(mu)

    def encode_masked(self, video: Tensor, mask: Tensor) -> Tensor:
        """`WanVAE.encode_masked`, one chunk at a time."""
        return self.encode((video - 0.5) * mask + 0.5)


class VAEStreamDecoder:
    """Chunk-by-chunk decoding that keeps the VAE's causal-conv cache between calls: feeding a clip
    chunk by chunk yields the same frames as decoding it whole (9 for the first 3 latents, 12 after).
    The cache is this object's own list (diffusers' `decode` and `encode` clear the module's)."""

    def __init__(self, vae: WanVAE):
        self.wan = vae
        self.reset()

    def reset(self) -> None:
        self.cache: list = [None] * self.wan.vae._cached_conv_counts["decoder"]
        self.first = True

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.wan.vae
        z = latents * self.wan.std.to(latents) + self.wan.mean.to(latents)
        x = vae.post_quant_conv(z)
        out = []
        for i in range(x.shape[2]):
            out.append(vae.decoder(x[:, :, i : i + 1], feat_cache=self.cache, feat_idx=[0], first_chunk=self.first))
            self.first = False
        video = torch.cat(out, dim=2).clamp(-1, 1)
        return (video.transpose(1, 2) + 1) / 2


def build_vae(profile: str | ModelConfig = "tiny", path: str | None = None) -> WanVAE:
    """The real Wan 2.1 VAE from a diffusers folder (config.json + weights; local or a URL; `path`, else
    cfg.vae_weights), or with no path a tiny random one of the profile's widths."""
    cfg = resolve_config(profile)
    path = cfg.vae_weights if path is None else path
    if path:
        if not storage.exists(path):
            raise FileNotFoundError(f"VAE weights not found: {path} (model.vae_weights)")
        return WanVAE(AutoencoderKLWan.from_pretrained(storage.cached(path), local_files_only=True).eval())
    with seeded(cfg.seed):
        vae = AutoencoderKLWan(
            base_dim=cfg.vae_base_dim, z_dim=cfg.latent_channels, num_res_blocks=cfg.vae_num_res_blocks
        )
    return WanVAE(vae.eval())


def mask_to_latent(mask: Tensor, factor: int = 8) -> Tensor:
    """Pixel mask [B, 1, H, W] (1 = keep) -> latent mask [B, 1, 1, H / 8, W / 8].

    A latent cell is kept only if all its pixels are kept (min-pool), so no masked pixel leaks in.
    """
    return (-F.max_pool2d(-mask.float(), factor)).unsqueeze(2)
