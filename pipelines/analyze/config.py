"""`make analyze`'s configuration: which teacher, which clips, the grid, and the derivation rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lipforcing.config import ClusterConfig, ConfigError
from lipforcing.data.windows import WindowConfig
from lipforcing.models.config import ModelConfig

AUTO_TEACHER = "auto"
# What `auto` finds: the teacher `make distill` (and so `make demo`) exports with its default output.
DEMO_TEACHER = "outputs/distill/teacher/dit.safetensors"


@dataclass
class BandRule:
    """How the sync band is read from the per-step curves (lipforcing/analysis/recipe.py)."""

    smooth: int = 5  # moving-average width over ODE steps
    keep: float = 0.5  # steps whose efficiency is at least this share of the best one
    cost_floor: float = 0.1  # fidelity cost floor, as a share of the largest |cost|


@dataclass
class LandingRule:
    """How the landing plateau and its chosen step are read from the two-call grid."""

    balance: float = 1.0  # weight of normalised fidelity against normalised Sync-C
    smooth: int = 3  # moving-average width over landing steps
    tolerance: float = 0.1  # plateau: within this share of the score's range of the best landing step


@dataclass
class AnalyzeConfig:
    profile: str = "tiny"  # the TEACHER's profile (a 1.3B student learns from the 14b teacher)
    # The teacher to analyse: a merged checkpoint (Wan layout), path or URL. `auto`: the one `make
    # distill` exports to outputs/distill/teacher/; on the tiny profile, when there is none, a
    # random-init tiny teacher, labelled as such in the logs, the report and the run's tags.
    teacher_weights: str = AUTO_TEACHER  # or a registered model (models:/name@alias)
    syncnet_weights: str = "models:/syncnet@champion"  # our SyncNet or syncnet_v2.model; path, URL or models:/
    # LPIPS as a TorchScript network (lipforcing/analysis/scoring.py); "" falls back to mouth-region L1
    lpips_weights: str = ""
    data: str = "outputs/data/heldout"  # held-out shards (the data job's <output>/heldout)
    output: str = "outputs/analyze"  # curves.json, recipe.yaml, evidence.json, report.md, plots/
    clips: int = 10  # the paper's analysis used 10 held-out clips
    max_frames: int = 81  # frames of each clip (4k + 1); 0: the whole clip
    decoder: Literal["tae", "vae"] = "tae"  # TAE for speed, the VAE when asked
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the tasks run; cuda needs GPUs in the cluster
    seed: int = 0  # shard order and the noise each clip starts from
    scales: list[float] = field(default_factory=lambda: [1.0, 4.5])  # s0 and s1 of the two-call grid
    landing_steps: list[int] = field(default_factory=lambda: [13, 40])  # first and last j1 (included)
    band: BandRule = field(default_factory=BandRule)
    landing: LandingRule = field(default_factory=LandingRule)
    window: WindowConfig = field(default_factory=WindowConfig)  # size and mask_box are used
    model: ModelConfig = field(default_factory=ModelConfig)  # the teacher's (teacher_steps, shift, guidance_scale)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def landing_range(self) -> list[int]:
        """The landing steps j1 the grid sweeps."""
        first, last = self.landing_steps
        return list(range(first, last + 1))


def validate(config: AnalyzeConfig) -> None:
    """Values that depend on each other, checked before any work."""
    steps = config.model.teacher_steps
    if config.clips < 1:
        raise ConfigError(f"config key 'clips' is {config.clips}; allowed values: an integer >= 1")
    if len(config.landing_steps) != 2 or not 1 <= config.landing_steps[0] <= config.landing_steps[1] < steps:
        raise ConfigError(f"config key 'landing_steps' is {config.landing_steps}; allowed values: [first, last] "
                          f"with 1 <= first <= last < model.teacher_steps ({steps})")  # fmt: skip
    if not config.scales:
        raise ConfigError("config key 'scales' is empty; allowed values: one or more guidance scales, e.g. [1.0, 4.5]")
    if not config.syncnet_weights:
        raise ConfigError("config key 'syncnet_weights' is empty; allowed values: a SyncNet checkpoint path, URL "
                          "or models:/ URI (the analysis scores Sync-C at every step)")  # fmt: skip


def teacher_location(config: AnalyzeConfig) -> str:
    """The teacher checkpoint to load, or "" for a random-init tiny teacher (tiny profile only)."""
    from lipforcing import storage

    wanted = config.teacher_weights
    if wanted == AUTO_TEACHER:
        if storage.exists(DEMO_TEACHER):
            return DEMO_TEACHER
        wanted = ""
    if wanted.startswith("models:/"):
        return wanted  # resolved by the job, with the registry at hand
    if wanted:
        if not storage.exists(wanted):
            raise ConfigError(f"config key 'teacher_weights' is {wanted!r}, which does not exist; allowed values: "
                              "a merged teacher checkpoint (path, URL or models:/), or 'auto'")  # fmt: skip
        return wanted
    if config.model.profile != "tiny":
        raise ConfigError(f"config key 'teacher_weights' is {config.teacher_weights!r} and no teacher was found at "
                          f"{DEMO_TEACHER}; allowed values: a merged teacher checkpoint (random init is for the tiny "
                          "profile only)")  # fmt: skip
    return ""
