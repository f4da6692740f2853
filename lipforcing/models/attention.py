"""3D rotary embedding, attention, the block-causal mask and the streaming KV cache.

Everything here works on whole latent frames: a frame is `frame_tokens` consecutive tokens
(h * w after patching), and both the causal mask and the cache reason in frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class Rope3D:
    """Wan's 3D RoPE: a head is split into (time, height, width) parts, 44/42/42 of 128 channels.

    Channels rotate in adjacent pairs (Wan views them as complex numbers). Angles are computed on the
    fly in float64 from integer positions, so the frame axis can use any positions we choose: absolute
    frame indices for full-sequence training, or window-local cache slots for dynamic RoPE.
    """

    def __init__(self, split: tuple[int, int, int], theta: float = 10000.0):
        self.split = split
        self.theta = theta

    def _angles(self, positions: Tensor, dim: int) -> Tensor:
        inv_freq = self.theta ** (
            -torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
        )
        return positions.to(torch.float64)[:, None] * inv_freq

    def __call__(self, frame_positions: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """cos/sin of shape [frames * height * width, 1, head_dim / 2] for tokens in (f, h, w) order."""
        dt, dh, dw = self.split
        device = frame_positions.device
        f = frame_positions.numel()
        a_t = self._angles(frame_positions, dt)[:, None, None].expand(f, height, width, -1)
        a_h = self._angles(torch.arange(height, device=device), dh)[None, :, None].expand(
            f, height, width, -1
        )
        a_w = self._angles(torch.arange(width, device=device), dw)[None, None, :].expand(f, height, width, -1)
        angles = torch.cat([a_t, a_h, a_w], dim=-1).reshape(f * height * width, 1, -1)
        return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate adjacent channel pairs of x [B, L, H, D] by the angles in rope (cos, sin [L, 1, D/2])."""
    cos, sin = rope
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention on [B, L, H, D] tensors; mask is boolean [Lq, Lk], True = attend."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def block_causal_mask(
    num_frames: int,
    frame_tokens: int,
    chunk_frames: int,
    window_frames: int | None = None,
    sink_frames: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean [L, L] mask: a query chunk sees every key up to the end of its own chunk.

    With `window_frames` set, it sees only the `sink_frames` first frames plus the most recent
    `window_frames - sink_frames` frames (its own chunk included): the same keys the streaming
    cache holds when it generates that chunk.
    """
    frame = torch.arange(num_frames, device=device)
    chunk_end = torch.clamp((frame // chunk_frames + 1) * chunk_frames, max=num_frames)
    visible = frame[None, :] < chunk_end[:, None]
    if window_frames is not None:
        recent = frame[None, :] >= (chunk_end[:, None] - (window_frames - sink_frames))
        visible = visible & (recent | (frame[None, :] < sink_frames))
    return visible.repeat_interleave(frame_tokens, dim=0).repeat_interleave(frame_tokens, dim=1)


class KVCache:
    """Per-block keys and values of whole latent frames for streaming, stored WITHOUT RoPE.

    Frames with absolute index < `sink_frames` are kept forever; other frames roll, the oldest evicted
    first. A chunk of n frames attends to the sink frames, the `rolling_frames - n` most recent cached
    frames and itself, so with the default (1, 6) the attention window is 7 frames and the cache never
    holds more than 7 frames, however long the rollout.
    """

    def __init__(self, num_layers: int, sink_frames: int, rolling_frames: int):
        self.sink_frames = sink_frames
        self.rolling_frames = rolling_frames
        self.keys: list[Tensor | None] = [None] * num_layers  # [B, frames, tokens, H, D]
        self.values: list[Tensor | None] = [None] * num_layers
        self.frames: list[int] = []  # absolute index of every cached frame, oldest first
        self.next_frame = 0  # absolute index of the next frame to generate

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def window(self, num_new: int) -> list[int]:
        """Cache slots (indices into `frames`) that a chunk of `num_new` frames attends to."""
        sink = [i for i, f in enumerate(self.frames) if f < self.sink_frames]
        rest = [i for i, f in enumerate(self.frames) if f >= self.sink_frames]
        keep = max(self.rolling_frames - num_new, 0)
        return sink + (rest[-keep:] if keep else [])

    def past(self, layer: int, slots: list[int]) -> tuple[Tensor, Tensor] | None:
        """Cached keys/values of `slots`, flattened to tokens [B, len(slots) * tokens, H, D]."""
        if not slots:
            return None
        k, v = self.keys[layer], self.values[layer]
        return k[:, slots].flatten(1, 2), v[:, slots].flatten(1, 2)

    def write(self, new_kv: list[tuple[Tensor, Tensor]], num_new: int) -> None:
        """Append a chunk's keys/values (one [B, num_new * tokens, H, D] pair per block), then evict."""
        frames = self.frames + list(range(self.next_frame, self.next_frame + num_new))
        sink = [i for i, f in enumerate(frames) if f < self.sink_frames]
        rest = [i for i, f in enumerate(frames) if f >= self.sink_frames]
        keep = sink + rest[-self.rolling_frames :]
        for layer, (k, v) in enumerate(new_kv):
            k, v = k.unflatten(1, (num_new, -1)), v.unflatten(1, (num_new, -1))
            if self.keys[layer] is not None:
                k = torch.cat([self.keys[layer], k], dim=1)
                v = torch.cat([self.values[layer], v], dim=1)
            self.keys[layer], self.values[layer] = k[:, keep], v[:, keep]
        self.frames = [frames[i] for i in keep]
        self.next_frame += num_new

    def nbytes(self) -> int:
        """Bytes held by the cached tensors (what stays resident between chunks)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
