"""Model profiles: one typed dataclass shared by the teacher, the causal student and their helpers.

`1.3b` and `14b` are the Wan 2.1 DiT sizes (OmniAvatar-LS lineage); `tiny` is the same code with
small widths so that every stage runs on a 2-core CPU: dim 64 = 2 heads of 32 channels (RoPE split
12/10/10 by Wan's own rule, 44/42/42 at 128), 6 layers (audio into blocks 2..3), text 16 x 64, a
2-layer 32-wide wav2vec2 (128 features per frame) and narrow VAE/TAE. Job configs embed
`ModelConfig` as their `model` section, so every field is a primitive or a list with a default.

`bench` is for speed on a CPU only (`benchmarks/bench_speed.py`; no job YAML, jobs do not take it):
wide enough that a student call is compute, not per-op overhead (dim 768 = 12 heads of 64, ffn 4x,
8 layers), with the released 65 input channels. Its decoders keep 1.3B's decoder : DiT compute at
512x512 when it runs at 128x128 (FLOP counter, per pixel of a latent frame's 3 student calls: 1.3B
42 MFLOP, bench 1.7, 25x less; the real Wan VAE decodes at 8.6 MFLOP per pixel, base width 20 at
0.38; taew2_1 0.40, widths 48..12 at 0.015). Text and audio are small: at 1.3B the text keys cost
about 1% of a student call and wav2vec2 far less than a clip's denoising, so bench keeps them tiny.

Parameter counts (meta device, 65 input channels as released): 1.3b 1,421,383,840 = Wan 2.1 T2V
1,418,996,800 + 49 extra patch-embedding input channels (301,056) + Audio Pack (2,085,984 with 14
block projections); 14b 14,294,081,696 = 14,288,491,584 + 1,003,520 + 4,586,592 (19 projections).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace


@dataclass
class ModelConfig:
    profile: str = "tiny"

    # DiT backbone (Wan 2.1 layout)
    dim: int = 64
    ffn_dim: int = 128
    num_heads: int = 2
    num_layers: int = 6
    freq_dim: int = 256
    text_dim: int = 64
    text_len: int = 16
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    latent_channels: int = 16
    # 65 input channels with the reference-sequence latent (released students), 49 without
    use_reference_sequence: bool = False
    eps: float = 1e-6
    rope_theta: float = 10000.0
    timestep_scale: float = 1000.0  # the DiT sees t * 1000, like Wan's scheduler timesteps

    # audio (wav2vec2 features -> Audio Pack -> per-block projections)
    audio_encoder_hidden: int = 32  # wav2vec2 hidden size (768 for wav2vec2-base-960h)
    audio_encoder_layers: int = 2  # wav2vec2 transformer layers (12 for base)
    audio_frames_per_latent: int = 4
    audio_hidden: int = 32

    # causal student
    chunk_frames: int = 3
    sink_frames: int = 1
    rolling_frames: int = 6  # sink + rolling = 7-frame attention window, current chunk included
    dynamic_rope: bool = True
    # (window_frames, sink_frames) layouts the Diffusion Forcing stage samples with equal weight
    training_attention_layouts: list[list[int]] = field(
        default_factory=lambda: [[7, 1], [10, 1], [13, 1], [9, 3], [12, 3]]
    )

    # LoRA
    lora_rank: int = 128
    lora_alpha: int = 64
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "ffn.0", "ffn.2"])

    # sampling recipe
    shift: float = 5.0
    teacher_steps: int = 50
    guidance_scale: float = 4.5
    student_timesteps: list[float] = field(default_factory=lambda: [0.999, 0.769])

    # decoders (tiny widths for the CPU profile; real values match the public checkpoints)
    vae_base_dim: int = 8
    vae_num_res_blocks: int = 1
    tae_channels: list[int] = field(default_factory=lambda: [32, 16, 8, 8])

    # weights: local paths or URLs; "" means random initialisation (only sensible for `tiny`)
    dit_weights: str = ""  # a Wan 2.1 base, or a merged checkpoint (ours, OmniAvatar-LS pre-merged)
    # An OmniAvatar-format checkpoint on top of dit_weights: LoRA A/B (merged as W + alpha/rank * B A),
    # the audio modules and the widened patch embedding. "" when dit_weights is already merged.
    dit_adapter: str = ""
    dit_adapter_alpha: float = 64.0  # the adapter's LoRA alpha (OmniAvatar: 64 at rank 128)
    vae_weights: str = ""
    tae_weights: str = ""
    audio_encoder_weights: str = ""
    text_embedding: str = ""
    negative_text_embedding: str = ""
    seed: int = 0  # seeds the random fixed text embeddings of the tiny profile

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Per-axis (time, height, width) share of a head: Wan's rule, 44/42/42 at head_dim 128."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw

    @property
    def in_channels(self) -> int:
        """noisy (16) + reference (16) + mask (1) + mouth-masked video (16) [+ reference sequence (16)]."""
        c = self.latent_channels
        return 3 * c + 1 + (c if self.use_reference_sequence else 0)

    @property
    def audio_feature_dim(self) -> int:
        """wav2vec2 features per video frame: last hidden state + all hidden states (14 x 768 = 10752)."""
        return (self.audio_encoder_layers + 2) * self.audio_encoder_hidden

    @property
    def audio_blocks(self) -> range:
        """Blocks that receive the audio projection: 2..L/2 (14 at 30 layers, 19 at 40)."""
        return range(2, self.num_layers // 2 + 1)


# What the real profiles share: UMT5-XXL text, wav2vec2-base audio, the real Wan VAE and taew2_1 widths,
# and the released students' 65 input channels (reference sequence included).
_PRETRAINED_ENCODERS = dict(
    use_reference_sequence=True,
    text_dim=4096,
    text_len=512,
    audio_encoder_hidden=768,
    audio_encoder_layers=12,
    vae_base_dim=96,
    vae_num_res_blocks=2,
    tae_channels=[256, 128, 64, 64],
)

PROFILES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "1.3b": ModelConfig(profile="1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, **_PRETRAINED_ENCODERS),
    "14b": ModelConfig(profile="14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, **_PRETRAINED_ENCODERS),
    "bench": ModelConfig(
        profile="bench", dim=768, ffn_dim=3072, num_heads=12, num_layers=8, use_reference_sequence=True,
        text_dim=256, text_len=32, audio_encoder_hidden=64, vae_base_dim=20, vae_num_res_blocks=2,
        tae_channels=[48, 24, 12, 12],
    ),
}


def resolve_config(profile: str | ModelConfig) -> ModelConfig:
    """Builders take a profile name or an already-filled config (e.g. the job config's `model`)."""
    return profile if isinstance(profile, ModelConfig) else model_config(profile)


def model_config(profile: str, **overrides: object) -> ModelConfig:
    """A fresh copy of a profile, optionally with fields replaced."""
    if profile not in PROFILES:
        raise ValueError(f"unknown model profile {profile!r}; allowed: {', '.join(PROFILES)}")
    return replace(copy.deepcopy(PROFILES[profile]), **overrides)
