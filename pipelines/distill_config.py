"""The `make distill` configuration: data windows, the model profile and one section per stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lipforcing.config import ClusterConfig
from lipforcing.data.shards import LoaderConfig
from lipforcing.data.windows import WindowConfig
from lipforcing.models.config import ModelConfig, model_config
from pipelines.trainer import TrainerConfig

STAGES = ("teacher", "student", "dmd")


@dataclass
class TeacherConfig:
    """LoRA finetune of the bidirectional DiT on V2V inpainting (flow matching, audio dropout)."""

    weights: str = ""  # an existing merged teacher (Wan layout): the stage is skipped
    # Full training from random init before the LoRA step, base.steps iterations: only for profiles
    # with no pretrained base (tiny). 0 means the base comes from teacher_model.dit_weights.
    base: TrainerConfig = field(default_factory=lambda: TrainerConfig(steps=0, lr=1e-4))
    train: TrainerConfig = field(default_factory=lambda: TrainerConfig(steps=5000, lr=1e-5, warmup_steps=1000))
    audio_dropout: float = 0.1  # share of samples trained on the null condition (for CFG)


@dataclass
class StudentConfig:
    """Diffusion Forcing pretraining of the causal student from the teacher's weights."""

    # An existing student (Wan layout; a path, URL or models:/ URI, e.g. the champion a retrain
    # fine-tunes): the stage is skipped and DMD starts from it.
    weights: str = ""
    train: TrainerConfig = field(default_factory=lambda: TrainerConfig(steps=5000, lr=1e-5, warmup_steps=1000))
    # Each chunk's noise level, drawn uniformly from this list. Released: the student's steps plus 0.0,
    # so a third of the chunks are clean context, as the streaming cache always is.
    noise_levels: list[float] = field(default_factory=lambda: [0.999, 0.769, 0.0])
    # x0: 0.5 * MSE on the clean estimate (released); velocity: flow-matching MSE (our earlier variant)
    loss: Literal["x0", "velocity"] = "x0"


@dataclass
class DMDConfig:
    """Self Forcing rollout + Sync-Window DMD + SyncNet reward."""

    train: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(steps=600, lr=2e-6, betas=[0.0, 0.999], checkpoint_every=50)
    )
    fake_score_lr: float = 2e-6
    fake_score_grad_clip: float = 0.0  # released: only the student's gradients are clipped (train.grad_clip)
    student_every: int = 5  # fake score every iteration, student every 5th (the 5:1 ratio)
    guidance_scale: float = 4.5
    window_steps: list[int] = field(default_factory=lambda: [20, 40])  # teacher ODE steps that get CFG
    # Where the teacher's CFG applies (the paper's schedule ablation): window (Sync-Window DMD, the
    # released recipe), all (static CFG), none (no CFG), reverse (CFG everywhere except the window)
    cfg_mode: Literal["window", "all", "none", "reverse"] = "window"
    # Re-noising time: shifted_uniform (released Lip Forcing) shifts u ~ U[timestep_bounds];
    # index_range (Self Forcing) shifts an index uniform in timestep_range of 1000.
    timestep_sampling: Literal["shifted_uniform", "index_range"] = "shifted_uniform"
    timestep_bounds: list[float] = field(default_factory=lambda: [0.001, 0.999])
    timestep_range: list[int] = field(default_factory=lambda: [20, 980])
    reward_beta: float = 2.0
    reward_weighting: Literal["per_sample", "self_normalised"] = "per_sample"
    # SyncNet for the reward: models:/name@alias, a path/URL, or "" to train without the reward
    syncnet: str = "models:/syncnet@champion"
    # EMA of the student, exported instead of the raw weights. Off as released; when on it starts at
    # iteration ema_start_step (Self Forcing's option), never at 0: over ~120 student steps an EMA
    # from the start would still hold a third of the pre-DMD weights.
    ema: bool = False
    ema_decay: float = 0.99
    ema_start_step: int = 200
    registered_name: str = "lipforcing-student"
    registered_alias: str = "candidate"  # promote to @champion after comparing runs in MLflow


@dataclass
class DistillConfig:
    profile: str = "tiny"
    data: str = "outputs/data"  # the data job's output (its shards/ are read)
    latents: str = ""  # a `make encode` cache to train from; empty encodes windows on the fly
    output: str = "outputs/distill"  # <output>/<stage>/dit.safetensors, Ray checkpoints, samples
    run_name: str = "distill"  # Ray Train runs are <run_name>-<stage>; a rerun resumes them
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    force: bool = False  # rerun stages whose output already exists
    # Real-size profiles start from pretrained weights; true lets them start from random init
    # (smoke tests and throughput runs only: the result is not a lip-sync model).
    allow_random_init: bool = False
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    seed: int = 0
    window: WindowConfig = field(default_factory=WindowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # the student (and its fake score)
    # The frozen teacher. Both paper students learn from the 14B teacher: the 1.3b profile pairs a
    # 14B teacher with a 1.3B student, which then starts from model.dit_weights (a same-size base).
    teacher_model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @classmethod
    def for_profile(cls, profile: str) -> DistillConfig:
        teacher = "14b" if profile == "1.3b" else profile
        return cls(profile=profile, model=model_config(profile), teacher_model=model_config(teacher))

    def missing_pretrained_weights(self) -> list[str]:
        """Config keys of pretrained weights this run needs but leaves empty (none for `tiny`)."""
        if self.model.profile == "tiny" or self.allow_random_init:
            return []
        needed = {"model.tae_weights": self.model.tae_weights}  # reward decoding, sample videos
        if "teacher" in self.stages and not self.teacher.weights:
            needed["teacher_model.dit_weights"] = self.teacher_model.dit_weights
        if not self.same_size_teacher():
            needed["model.dit_weights"] = self.model.dit_weights
        if not self.latents:  # without a `make encode` cache, windows are encoded on the fly
            for key in ("vae_weights", "audio_encoder_weights", "text_embedding", "negative_text_embedding"):
                needed[f"model.{key}"] = getattr(self.model, key)
        return [key for key, value in needed.items() if not value]

    def same_size_teacher(self) -> bool:
        """Whether the student can start from the teacher's weights (else from model.dit_weights)."""
        shape = ("dim", "ffn_dim", "num_heads", "num_layers")
        return all(getattr(self.model, k) == getattr(self.teacher_model, k) for k in shape)
