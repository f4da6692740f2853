"""The causal student: the teacher's weights and names, block-causal attention, a streaming KV cache.

Two ways to run the same weights:
- full-sequence (training): `forward` with a block-causal mask over chunks of `chunk_frames` latent
  frames, optionally limited to a (window, sink) layout; RoPE positions are absolute frame indices.
- streaming (rollout / inference): `forward_chunk` on one chunk at a time against a `KVCache` of
  `sink_frames + rolling_frames` frames. With dynamic RoPE the cached keys (stored without RoPE) get
  window-local positions 0..6 at attention time, so any rollout length stays in the trained range.
After a chunk is generated, `cache_clean_chunk` runs it once more at t = 0 to write the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lipforcing.models.attention import KVCache, block_causal_mask
from lipforcing.models.conditioning import Condition
from lipforcing.models.wan import WanModel


class CausalWanModel(WanModel):
    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        cond: Condition,
        window_frames: int | None = None,
        sink_frames: int = 0,
    ) -> Tensor:
        """Block-causal velocity for a whole clip; timestep [B] or per frame [B, F] (Diffusion Forcing)."""
        _, ph, pw = self.cfg.patch_size
        frame_tokens = (x.shape[3] // ph) * (x.shape[4] // pw)
        mask = block_causal_mask(
            x.shape[2], frame_tokens, self.cfg.chunk_frames, window_frames, sink_frames, device=x.device
        )
        return super().forward(x, timestep, cond, attn_mask=mask)

    def new_cache(self, sink_frames: int | None = None, rolling_frames: int | None = None) -> KVCache:
        """An empty streaming cache (defaults: the profile's 1 sink + 6 rolling frames)."""
        return KVCache(
            len(self.blocks),
            self.cfg.sink_frames if sink_frames is None else sink_frames,
            self.cfg.rolling_frames if rolling_frames is None else rolling_frames,
        )

    def forward_chunk(
        self, x: Tensor, timestep: Tensor, cond: Condition, cache: KVCache, write: bool = False
    ) -> Tensor:
        """Velocity for the next chunk x [B, 16, n, h, w] given the cache; `cond` covers these n frames.

        With write=True the chunk's keys/values are appended to the cache (oldest non-sink evicted).
        """
        n = x.shape[2]
        slots = cache.window(n)
        new_frames = list(range(cache.next_frame, cache.next_frame + n))
        if self.cfg.dynamic_rope:
            key_frames = list(range(len(slots) + n))
        else:
            key_frames = [cache.frames[s] for s in slots] + new_frames
        keys = torch.tensor(key_frames, device=x.device)
        past = [cache.past(i, slots) for i in range(len(self.blocks))] if slots else None
        out, new_kv = self.run(x, timestep, cond, keys[-n:], keys, past=past, keep_kv=write)
        if write:
            cache.write(new_kv, n)
        return out

    @torch.no_grad()
    def cache_clean_chunk(self, x0: Tensor, cond: Condition, cache: KVCache) -> None:
        """Write a generated clean chunk into the cache by running it at t = 0 (context noise 0).

        Runs without gradient, as in Self Forcing: the cache is context, never a path for gradients.
        """
        self.forward_chunk(x0, torch.zeros(x0.shape[0], device=x0.device), cond, cache, write=True)
