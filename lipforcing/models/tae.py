"""A TAEHV-architecture tiny autoencoder for Wan 2.1 latents (the `taew2_1.pth` key layout).

Cheap decoder for rewards and previews: it reads the DiT's latents directly (no extra scale/shift)
and returns RGB in [0, 1]. Temporal structure: each "memory block" sees its input frame and the
previous frame's input; two x2 temporal growth stages turn T latents into 4T frames, of which the
first 3 are dropped, giving 4T - 3 (9 frames for the first 3-latent chunk, 12 after).
Layers live in `encoder` / `decoder` nn.Sequentials so their indices are the checkpoint's key names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(c_in: int, c_out: int, **kwargs: object) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kwargs)


class SoftClamp(nn.Module):
    """tanh(x / 3) * 3: keeps out-of-range latents from blowing up the decoder."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual conv block over (current frame, previous frame's input)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(2 * c_in, c_out), nn.ReLU(), conv3x3(c_out, c_out), nn.ReLU(), conv3x3(c_out, c_out)
        )
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """Merge `stride` consecutive frames into one with a 1x1 conv over their stacked channels."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x [N * T, C, H, W] (frames consecutive) -> [N * T / stride, C, H, W]."""
        return self.conv(x.reshape(-1, self.stride * x.shape[1], *x.shape[2:]))


class TGrow(nn.Module):
    """Split one frame into `stride` frames with a 1x1 conv (stride 1 is a learned projection)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x [N * T, C, H, W] -> [N * T * stride, C, H, W], the new frames of each input consecutive."""
        return self.conv(x).reshape(-1, *x.shape[1:])


def _run_parallel(layers: nn.Sequential, x: Tensor) -> Tensor:
    """Apply layers to all frames at once; x [N, T, C, H, W] -> [N, T', C', H', W']."""
    n = x.shape[0]
    x = x.flatten(0, 1)
    for layer in layers:
        if isinstance(layer, MemBlock):
            frames = x.unflatten(0, (n, -1))
            past = F.pad(frames, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1]  # previous frame, zeros before the first
            x = layer(x, past.flatten(0, 1))
        else:
            x = layer(x)
    return x.unflatten(0, (n, -1))


class TinyAutoencoder(nn.Module):
    """TAEHV for Wan 2.1: patch size 1, 16 latent channels, 8x spatial and 4x temporal compression."""

    def __init__(self, channels: list[int] | tuple[int, ...] = (256, 128, 64, 64), latent_channels: int = 16):
        super().__init__()
        c0, c1, c2, c3 = channels
        e = c3  # encoder width (64 in taew2_1)
        self.latent_channels = latent_channels
        self.encoder = nn.Sequential(
            conv3x3(3, e), nn.ReLU(),
            TPool(e, 2), conv3x3(e, e, stride=2, bias=False), MemBlock(e, e), MemBlock(e, e), MemBlock(e, e),
            TPool(e, 2), conv3x3(e, e, stride=2, bias=False), MemBlock(e, e), MemBlock(e, e), MemBlock(e, e),
            TPool(e, 1), conv3x3(e, e, stride=2, bias=False), MemBlock(e, e), MemBlock(e, e), MemBlock(e, e),
            conv3x3(e, latent_channels),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            SoftClamp(), conv3x3(latent_channels, c0), nn.ReLU(),
            MemBlock(c0, c0), MemBlock(c0, c0), MemBlock(c0, c0), nn.Upsample(scale_factor=2), TGrow(c0, 1),
            conv3x3(c0, c1, bias=False),
            MemBlock(c1, c1), MemBlock(c1, c1), MemBlock(c1, c1), nn.Upsample(scale_factor=2), TGrow(c1, 2),
            conv3x3(c1, c2, bias=False),
            MemBlock(c2, c2), MemBlock(c2, c2), MemBlock(c2, c2), nn.Upsample(scale_factor=2), TGrow(c2, 2),
            conv3x3(c2, c3, bias=False),
            nn.ReLU(), conv3x3(c3, 3),
        )  # fmt: skip
        self.time_upscale = 4
        self.frames_to_trim = self.time_upscale - 1

    def encode(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] in [0, 1] -> latents [B, 16, ceil(T / 4), H / 8, W / 8]."""
        pad = -video.shape[1] % self.time_upscale
        if pad:
            video = torch.cat([video, video[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        return _run_parallel(self.encoder, video).transpose(1, 2)

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, 16, F, h, w] -> frames [B, 4F - 3, 3, 8h, 8w] in [0, 1], all frames at once."""
        frames = _run_parallel(self.decoder, latents.transpose(1, 2))
        return frames[:, self.frames_to_trim :].clamp(0, 1)

    def stream_decoder(self) -> TAEStreamDecoder:
        return TAEStreamDecoder(self)


class TAEStreamDecoder:
    """Frame-by-frame decoding with constant memory: one remembered input per memory block.

    Feeding latents chunk by chunk gives exactly the frames of `TinyAutoencoder.decode` on the whole clip.
    """

    def __init__(self, tae: TinyAutoencoder):
        self.tae = tae
        self.reset()

    def reset(self) -> None:
        self.memory: list[Tensor | None] = [None] * len(self.tae.decoder)
        self.frames_out = 0

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, 16, n, h, w] -> the frames they complete, [B, T, 3, H, W] in [0, 1]."""
        out = []
        for frame in latents.unbind(2):
            out += self._run(frame, 0)
        keep = out[max(self.tae.frames_to_trim - self.frames_out, 0) :]
        self.frames_out += len(out)
        if not keep:
            return latents.new_zeros(latents.shape[0], 0, 3, 8 * latents.shape[3], 8 * latents.shape[4])
        return torch.stack(keep, dim=1).clamp(0, 1)

    def _run(self, x: Tensor, start: int) -> list[Tensor]:
        layers = self.tae.decoder
        for i in range(start, len(layers)):
            layer = layers[i]
            if isinstance(layer, MemBlock):
                past = self.memory[i] if self.memory[i] is not None else torch.zeros_like(x)
                self.memory[i] = x
                x = layer(x, past)
            elif isinstance(layer, TGrow):
                subframes = layer(x).unflatten(0, (-1, layer.stride)).unbind(1)
                return [y for sub in subframes for y in self._run(sub, i + 1)]
            else:
                x = layer(x)
        return [x]
