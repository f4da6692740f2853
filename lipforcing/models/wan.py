"""Wan 2.1 DiT with OmniAvatar-style lip-sync conditioning: the bidirectional teacher.

Module and parameter names follow the original Wan checkpoint (`patch_embedding`, `blocks.N.self_attn.q`,
`head.modulation`, ...) plus OmniAvatar's audio modules (`audio_proj`, `audio_cond_projs`), so real
Wan 2.1 / OmniAvatar-LS safetensors load without renaming. Timesteps are flow times t in [0, 1]
(1 = noise), given per sample [B] or per latent frame [B, F]; the output is the velocity eps - x0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lipforcing.models.attention import Rope3D, apply_rope, attention
from lipforcing.models.audio import AudioPack
from lipforcing.models.conditioning import Condition
from lipforcing.models.config import ModelConfig

KV = tuple[Tensor, Tensor]


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Wan's timestep embedding: [cos | sin] of t * 10000^(-i / half), computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x [B, F, N, D] * (1 + scale) + shift with per-frame [B, F, 1, D] vectors, in float32."""
    return (x.float() * (1 + scale) + shift).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def forward(
        self,
        x: Tensor,
        rope_q: tuple[Tensor, Tensor],
        rope_k: tuple[Tensor, Tensor],
        mask: Tensor | None = None,
        past: KV | None = None,
    ) -> tuple[Tensor, KV]:
        """Attend x to (past, x); returns the output and x's keys/values before RoPE (for the cache)."""
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(x)).unflatten(-1, heads)
        v = self.v(x).unflatten(-1, heads)
        k_all, v_all = (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))
        out = attention(apply_rope(q, rope_q), apply_rope(k_all, rope_k), v_all, mask)
        return self.o(out.flatten(-2)), (k, v)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(context)).unflatten(-1, heads)
        v = self.v(context).unflatten(-1, heads)
        return self.o(attention(q, k, v).flatten(-2))


class WanBlock(nn.Module):
    """Self-attention, cross-attention to text, GELU(tanh) FFN; AdaLN modulation from the timestep."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)  # cross_attn_norm=True in Wan 2.1
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: Tensor,
        e: Tensor,
        context: Tensor,
        rope_q: tuple[Tensor, Tensor],
        rope_k: tuple[Tensor, Tensor],
        mask: Tensor | None = None,
        past: KV | None = None,
    ) -> tuple[Tensor, KV]:
        """x [B, F, N, D] (N tokens per frame), e [B, F, 6, D] per-frame time embedding."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e.float()).unsqueeze(2).unbind(3)
        h = modulate(self.norm1(x), shift1, scale1)
        y, kv = self.self_attn(h.flatten(1, 2), rope_q, rope_k, mask, past)
        x = x + (y.unflatten(1, x.shape[1:3]) * gate1).type_as(x)
        x = x + self.cross_attn(self.norm3(x).flatten(1, 2), context).unflatten(1, x.shape[1:3])
        y = self.ffn(modulate(self.norm2(x), shift2, scale2))
        return x + (y * gate2).type_as(x), kv


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, F, N, D], e [B, F, D] (the time embedding before the 6-way projection)."""
        shift, scale = (self.modulation + e.float().unsqueeze(2)).unsqueeze(2).unbind(3)
        return self.head(modulate(self.norm(x), shift, scale))


class WanModel(nn.Module):
    """The bidirectional DiT. `forward` runs a full clip; `run` is the shared core the student reuses."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim, patch = cfg.dim, tuple(cfg.patch_size)
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=patch, stride=patch)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            WanBlock(dim, cfg.ffn_dim, cfg.num_heads, cfg.eps) for _ in range(cfg.num_layers)
        )
        self.head = Head(dim, cfg.latent_channels * math.prod(patch), cfg.eps)
        self.audio_proj = AudioPack(cfg.audio_frames_per_latent * cfg.audio_feature_dim, cfg.audio_hidden)
        self.audio_cond_projs = nn.ModuleList(nn.Linear(cfg.audio_hidden, dim) for _ in cfg.audio_blocks)
        self.rope = Rope3D(cfg.rope_split, cfg.rope_theta)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Wan's initialisation (xavier linears, zero biases, N(0, 0.02) embeddings) for random runs."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm | nn.RMSNorm) and m.weight is not None:
                m.reset_parameters()
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for p in [self.head.modulation, *(b.modulation for b in self.blocks)]:
            p.normal_().div_(self.cfg.dim**0.5)

    def forward(
        self, x: Tensor, timestep: Tensor, cond: Condition, attn_mask: Tensor | None = None
    ) -> Tensor:
        """Velocity for a whole clip. x [B, 16, F, h, w]; timestep [B] or [B, F] in [0, 1]."""
        frames = torch.arange(x.shape[2], device=x.device)
        out, _ = self.run(x, timestep, cond, frames, frames, attn_mask)
        return out

    def run(
        self,
        x: Tensor,
        timestep: Tensor,
        cond: Condition,
        query_frames: Tensor,
        key_frames: Tensor,
        attn_mask: Tensor | None = None,
        past: list[KV | None] | None = None,
        keep_kv: bool = False,
    ) -> tuple[Tensor, list[KV]]:
        """One DiT pass over the frames of x.

        query_frames / key_frames are the RoPE frame positions of x's frames and of (past, x)'s frames;
        past holds, per block, cached keys/values (before RoPE) that x's queries also attend to.
        Returns the velocity and, with keep_kv, per block x's own keys/values before RoPE (for a cache).
        """
        b, _, f, h, w = x.shape
        pt, ph, pw = self.cfg.patch_size
        f, h, w = f // pt, h // ph, w // pw
        dtype = self.patch_embedding.weight.dtype  # compute in the weights' dtype, answer in x's
        tokens = self.patch_embedding(torch.cat([x, cond.channels(x.shape[2]).to(x.dtype)], dim=1).to(dtype))
        tokens = tokens.flatten(3).transpose(1, 2).transpose(2, 3)  # [B, F, N, D]

        t = timestep.reshape(b, -1).expand(b, f) * self.cfg.timestep_scale
        e = self.time_embedding(sinusoidal_embedding(t, self.cfg.freq_dim).to(tokens.dtype))  # [B, F, D]
        e6 = self.time_projection(e).unflatten(-1, (6, -1))  # [B, F, 6, D]
        context = self.text_embedding(cond.text.to(tokens.dtype))
        audio = self.audio_proj(cond.audio.to(tokens.dtype))  # [B, F, audio_hidden]

        rope_q = self.rope(query_frames, h, w)
        rope_k = self.rope(key_frames, h, w)
        audio_blocks = {block: i for i, block in enumerate(self.cfg.audio_blocks)}
        new_kv = []
        for i, block in enumerate(self.blocks):
            if i in audio_blocks:
                tokens = tokens + self.audio_cond_projs[audio_blocks[i]](audio).unsqueeze(2)
            args = (tokens, e6, context, rope_q, rope_k, attn_mask, None if past is None else past[i])
            tokens, kv = block(*args)
            if keep_kv:
                new_kv.append(kv)
        return self.unpatchify(self.head(tokens, e), (f, h, w)).to(x.dtype), new_kv

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, F, N, prod(patch) * C] tokens -> [B, C, F * pt, h * ph, w * pw] latents."""
        (f, h, w), (pt, ph, pw) = grid, self.cfg.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], -1, f * pt, h * ph, w * pw)
