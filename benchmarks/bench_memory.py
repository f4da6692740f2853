"""Per-GPU training memory of every distill stage at the 1.3b and 14b profiles, computed, not measured.

    python -m benchmarks.bench_memory            # print the markdown section
    python -m benchmarks.bench_memory --write    # also replace "## Training memory" in RESULTS.md

Parameter counts are exact (the profiles' models built on the meta device; LoRA counted as
`apply_lora` trains it); bytes per parameter follow DeepSpeed's bf16 ZeRO layout; activations are an
estimate from the token count (stated below). The profile YAML gives the ZeRO stage, worker count,
micro-batch and activation checkpointing of each stage, so the table follows the configs users run.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from benchmarks.results import report
from lipforcing.models import build_teacher
from lipforcing.models.config import ModelConfig
from lipforcing.models.lora import adapted_parameter_count
from pipelines.distill_config import DistillConfig
from pipelines.jobs import resolve_config
from pipelines.trainer import TrainerConfig, accumulation

HEADING = "## Training memory"
COMMAND = "python -m benchmarks.bench_memory --write"
GPU_GB = 80.0  # H100 SXM
GB = 1e9
BF16, FP32 = 2, 4
CACHE_FRAMES = 7  # the student's streaming cache: 1 sink + 6 rolling latent frames


@dataclass
class Network:
    """A network of a stage, by its parameter counts and whether it trains."""

    name: str
    total: int
    trainable: int  # 0 for a frozen network


def parameter_counts(model: ModelConfig, rank: int) -> tuple[int, int]:
    """(all parameters, those a stage's LoRA adapter trains) of a profile's DiT, exactly."""
    meta = build_teacher(model, device="meta")
    return sum(p.numel() for p in meta.parameters()), adapted_parameter_count(meta, rank, model.lora_targets)


def tokens(config: DistillConfig) -> int:
    """Tokens of one training window: 81 frames -> 21 latent frames of (512 / 8 / 2)^2 patches."""
    latent_frames = (config.window.frames - 1) // 4 + 1
    side = config.window.size // 8 // config.model.patch_size[1]
    return latent_frames * side * side


def weight_bytes(network: Network, train: TrainerConfig) -> dict[str, float]:
    """bf16 weights (ZeRO-3 shards all of them, frozen ones too), gradients of the trained part
    (fp32 partitions from ZeRO-2 on, bf16 whole below), fp32 master copy + Adam moments (partitioned
    from ZeRO-1 on)."""
    shards = train.num_workers
    weights = BF16 * network.total / (shards if train.zero_stage == 3 else 1)
    grads = network.trainable * (FP32 / shards if train.zero_stage >= 2 else BF16)
    optimizer = 3 * FP32 * network.trainable / (shards if train.zero_stage >= 1 else 1)
    return {"weights": weights, "grads": grads, "optimizer": optimizer}


def block_working_set(model: ModelConfig, count: int) -> float:
    """Bytes one block keeps for backward over `count` tokens (bf16): about 14 dim-wide tensors
    (norms, modulated inputs, q/k/v/o, cross-attention, residuals) and 2 ffn-wide ones."""
    return BF16 * count * (14 * model.dim + 2 * model.ffn_dim)


def activation_bytes(model: ModelConfig, train: TrainerConfig, count: int) -> float:
    """Activations of one trained forward over `count` tokens per sample: with checkpointing, each
    block's input plus one block's working set during recompute; without, every block's working set."""
    count *= train.batch_size
    if train.activation_checkpointing:
        return BF16 * count * model.dim * model.num_layers + block_working_set(model, count)
    return block_working_set(model, count) * model.num_layers


PAPER_GPUS = 4  # the profiles leave num_workers to the cluster; the paper trains on 4 GPUs


def trainer_on(config: DistillConfig, stage: str, gpus: int = PAPER_GPUS) -> TrainerConfig:
    """A stage's trainer as it runs on `gpus` workers when the profile leaves the count to the cluster."""
    train = getattr(config, stage).train
    workers = train.num_workers or gpus
    return dataclasses.replace(train, num_workers=workers, grad_accum=accumulation(train, workers, f"{stage}.train"))


def stage_memory(config: DistillConfig, stage: str, frozen_teacher_fp32: bool = False) -> dict[str, float]:
    """Per-GPU GB of one stage by component. `frozen_teacher_fp32` gives the DMD teacher as it was held
    before (fp32, whole on every GPU) for comparison."""
    rank = config.model.lora_rank
    train = trainer_on(config, stage)
    count = tokens(config)
    if stage == "teacher":
        total, trainable = parameter_counts(config.teacher_model, rank)
        trained, frozen, models = [Network("teacher", total, trainable)], [], [config.teacher_model]
    else:
        total, trainable = parameter_counts(config.model, rank)
        trained = [Network("student", total, trainable)]
        models = [config.model]
        frozen = []
        if stage == "dmd":
            trained.append(Network("fake_score", total, trainable))
            frozen = [Network("teacher", parameter_counts(config.teacher_model, rank)[0], 0)]
    parts = {"weights": 0.0, "grads": 0.0, "optimizer": 0.0}
    for network in trained:
        for key, value in weight_bytes(network, train).items():
            parts[key] += value
    teacher = 0.0
    for network in frozen:
        if frozen_teacher_fp32:
            teacher += FP32 * network.total
        else:
            teacher += BF16 * network.total / (train.num_workers if train.zero_stage == 3 else 1)
    model = models[0]
    activations = activation_bytes(model, train, count)
    if stage == "dmd":
        # the student's rollout graph (all chunks' exit steps) and its KV cache are held while the
        # teacher runs its conditional + null batch; the fake score's own graph comes after
        cache = 2 * BF16 * CACHE_FRAMES * (count // ((config.window.frames - 1) // 4 + 1)) * model.dim * model.num_layers
        teacher_pass = block_working_set(config.teacher_model, 2 * count * train.batch_size)
        activations = max(activations + cache * train.batch_size + teacher_pass, activations)
    result = {key: value / GB for key, value in parts.items()}
    result.update({"frozen teacher": teacher / GB, "activations": activations / GB})
    result["total"] = sum(result.values())
    return result


COMPONENTS = ("weights", "grads", "optimizer", "frozen teacher", "activations", "total")


def rows(profile: str) -> list[str]:
    config = resolve_config(DistillConfig, [f"profile={profile}"])
    lines = []
    for stage in ("teacher", "student", "dmd"):
        train = trainer_on(config, stage)
        memory = stage_memory(config, stage)
        fits = "yes" if memory["total"] <= GPU_GB else "**no**"
        setup = f"ZeRO-{train.zero_stage}, {train.num_workers} GPUs, act. ckpt {'on' if train.activation_checkpointing else 'off'}"
        lines.append(
            f"| {profile} | {stage} | {setup} | " + " | ".join(f"{memory[c]:.1f}" for c in COMPONENTS) + f" | {fits} |"
        )
    return lines


def before_rows() -> list[str]:
    """DMD as the profiles had it before this table: teacher fp32 whole, no activation checkpointing,
    ZeRO-2."""
    lines = []
    for profile in ("1.3b", "14b"):
        config = resolve_config(DistillConfig, [f"profile={profile}", "dmd.train.activation_checkpointing=false", "dmd.train.zero_stage=2"])
        memory = stage_memory(config, "dmd", frozen_teacher_fp32=True)
        fits = "yes" if memory["total"] <= GPU_GB else "**no**"
        lines.append(
            f"| {profile} | dmd (before) | ZeRO-2, 4 GPUs, act. ckpt off, teacher fp32 | "
            + " | ".join(f"{memory[c]:.1f}" for c in COMPONENTS) + f" | {fits} |"
        )  # fmt: skip
    return lines


def markdown() -> str:
    config = resolve_config(DistillConfig, ["profile=1.3b"])
    counts = {p: parameter_counts(resolve_config(DistillConfig, [f"profile={p}"]).model, 128) for p in ("1.3b", "14b")}
    header = "| profile | stage | setup | " + " | ".join(COMPONENTS) + " | fits 80 GB |"
    return "\n".join(
        [
            HEADING,
            "",
            f"Computed, not measured (`{COMMAND}`): GB (1e9 bytes) per GPU for one micro-batch, bf16 training "
            f"as the profiles configure it, against an H100's {GPU_GB:.0f} GB. Models: 1.3B student "
            f"{counts['1.3b'][0]:,} parameters ({counts['1.3b'][1]:,} trained: LoRA rank 128 on q, k, v, o of both "
            f"attentions and the FFN, plus the audio modules and the 65-channel patch embedding); 14B "
            f"{counts['14b'][0]:,} ({counts['14b'][1]:,} trained). Both students learn from the frozen 14B "
            f"teacher. One window: {config.window.frames} frames at {config.window.size} px = {tokens(config):,} tokens.",
            "",
            "- weights: bf16, every parameter of each trained network (base and adapter), sharded only under ZeRO-3;",
            "- grads: the trained parameters only (fp32 partitions from ZeRO-2 on); optimizer: fp32 master copy "
            "and AdamW's two moments of the trained parameters, partitioned from ZeRO-1 on;",
            "- frozen teacher (DMD): bf16, whole under ZeRO-2, 1/N under ZeRO-3 (an optimizer-less DeepSpeed engine);",
            "- activations (an estimate): with checkpointing each block's bf16 input plus one block's working set "
            "(~14 dim-wide + 2 ffn-wide tensors per token); DMD adds the rollout's KV cache (7 latent frames) and "
            "the teacher's conditional + null pass while the student's graph is held. Not counted: the on-the-fly "
            "encoders (Wan VAE, wav2vec2; train from a `make encode` cache at scale), the TAE and SyncNet of the "
            "reward (under 1 GB), CUDA context and allocator fragmentation (a few GB).",
            "",
            header,
            "|---" * (len(COMPONENTS) + 4) + "|",
            *rows("1.3b"),
            *rows("14b"),
            *before_rows(),
            "",
            "The `before` rows are the DMD stage as the profiles ran it before the frozen teacher moved to bf16 and "
            "ZeRO-3, with activation checkpointing off in DMD: neither scale fit. Both profiles now checkpoint "
            "activations in every stage; the 14b profile runs DMD under ZeRO-3 (three 14B networks, two of them "
            "trained, would hold 86 GB of bf16 weights per GPU under ZeRO-2).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the {HEADING!r} section of RESULTS.md")
    return report(markdown(), HEADING, parser.parse_args(argv).write)


if __name__ == "__main__":
    main()
