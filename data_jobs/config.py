"""The data job's typed configuration (`python -m pipelines.data key=value ...`).

Sections follow the video2dataset split: what to read (`input`), what each ingest stage does
(`ingest`, `faces`, `align`, `iqa`), how samples are stored (`write`) and how the work is
distributed (`execution`). Keys listed in `HASH_EXCLUDE` do not change the produced data, so two
runs that differ only there share a config hash.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from lipforcing.config import ClusterConfig, ConfigError
from lipforcing.data import FPS, SAMPLE_RATE

DEFAULT_SAMPLE = "outputs/sample"
DEFAULT_INPUT = f"{DEFAULT_SAMPLE}/list.csv"

# Keys that say where data goes and how fast it is made, not what it is.
# The score pass is excluded too: it reads the aligned shards, so changing its thresholds or
# SyncNet reuses them; the final output's config.yaml records the score settings.
HASH_EXCLUDE = ("output", "profile", "execution", "cluster", "score")


@dataclass
class IngestConfig:
    fps: float = float(FPS)
    sample_rate: int = SAMPLE_RATE
    min_segment_s: float = 5.0
    max_segment_s: float = 10.0
    # PySceneDetect ContentDetector threshold (HSV content change, 0-255 scale); lower cuts more.
    shot_threshold: float = 27.0
    # Shot detection runs on frames downscaled to this width (it only needs coarse content).
    shot_width: int = 96
    # Probe rejects inputs whose shorter side is below this (no usable face crop comes from them).
    min_side: int = 64
    # Probe rejects longer inputs before decoding anything (their audio is decoded into memory).
    max_duration_s: float = 3600.0


@dataclass
class FacesConfig:
    backend: Literal["dlib", "insightface"] = "dlib"
    # InsightFace model-pack folder (e.g. .../buffalo_l), local or s3://; required for insightface.
    model_pack: str = ""
    # InsightFace: whole-frame detection runs on a copy whose longer side is at most this many pixels.
    detect_size: int = 512
    # dlib: the smallest face (box width, source pixels) the whole-frame search must find; the
    # frame is scaled (up when needed) so such a face meets the detector's 80 px window.
    min_face_size: int = 64
    # Run the detector every `stride` frames; frames in between are interpolated.
    stride: int = 5
    # dlib: between whole-frame searches the face is looked for around its last box; every
    # `check_every`-th detection searches the whole frame again (for a comparable second face).
    check_every: int = 5
    # Landmark smoothing: Gaussian sigma in frames (0 disables).
    smooth_sigma: float = 1.5
    # Fraction of detection frames allowed to miss the face (the gaps are interpolated).
    max_missing: float = 0.1
    # A second face whose box area is at least this fraction of the main face's is "comparable".
    second_face_ratio: float = 0.5
    # Fraction of detection frames allowed to show a comparable second face.
    max_multi_face: float = 0.1
    # Faces scoring below this are ignored (dlib HOG margin; insightface probability).
    min_score: float = 0.0


@dataclass
class AlignConfig:
    size: int = 512
    # "loose": the ArcFace 5-point layout shrunk so forehead and chin fit; "arcface": the tight one.
    template: Literal["loose", "arcface"] = "loose"


@dataclass
class IqaConfig:
    backend: Literal["sharpness", "hyperiqa"] = "sharpness"
    # HyperIQA KonIQ checkpoint (koniq_pretrained.pkl), local or s3://; required for hyperiqa.
    weights: str = ""
    threshold: float = 40.0


@dataclass
class WriteConfig:
    shard_name: str = "lipforcing"
    crf: int = 20
    preset: str = "veryfast"
    # A shard closes when either limit is reached; 0 disables that limit.
    shard_max_samples: int = 64
    shard_max_bytes: int = 1 << 30
    # Consecutive inputs (sorted) processed by one task: the unit of resume.
    inputs_per_task: int = 4


@dataclass
class ScoreConfig:
    """The SyncNet pass over the aligned shards (see data_jobs/score.py)."""

    enabled: bool = True
    # SyncNet weights: models:/name@alias (MLflow registry), a path or URL (syncnet_v2.model or ours)
    syncnet: str = "models:/syncnet@champion"
    # No usable weights (none found, or foreign ones refused): train our SyncNet on the aligned shards
    # first (the embedded default), or stop before scoring.
    train_if_missing: bool = False
    # A registered SyncNet trained on other data (its lineage tags differ, see pipelines/syncnet_choice.py)
    # is refused unless this is true; a file given by path has no lineage and is always accepted.
    allow_foreign_syncnet: bool = False
    syncnet_output: str = ""  # where a SyncNet trained here goes; "" is <output>/syncnet, beside the shards
    syncnet_steps: int = 60
    # Drop below this Sync-C, on the scale of the SyncNet that scores: 3.0 for the public syncnet_v2
    # (its embeddings are unnormalised); ours compares unit vectors, so its Sync-C is at most 2 and
    # in-sync clips score about 0.1-0.3 (calibrated on the embedded sample).
    min_confidence: float = 3.0
    min_confidence_ours: float = 0.05
    max_offset: int = 6  # frames; larger measured offsets are dropped, smaller ones corrected


@dataclass
class SplitConfig:
    """Which identities are held out for evaluation; the job writes them apart from training data."""

    # Share of identities held out, chosen by a hash of `dataset/identity`: an identity keeps its side
    # as inputs are added, and never has clips on both sides.
    heldout_fraction: float = 0.02
    # A text (one path a line) or CSV/Parquet (`video` column) list of inputs to hold out, e.g. HDTF's
    # test clips; an entry matches a video by its path, any trailing part of it, or without extension.
    # Their identities are held out whole.
    heldout_list: str = ""


@dataclass
class ExecutionConfig:
    # Tasks in flight at once (0: one per CPU of the Ray cluster).
    concurrency: int = 0
    num_cpus_per_task: float = 1.0
    # GPUs per ingest worker (face detection/landmarks and HyperIQA run on it when > 0).
    ingest_num_gpus: float = 0.0
    # GPUs per SyncNet scoring worker.
    score_num_gpus: float = 0.0
    # Tries of one task (and of a worker that died running it) before its inputs become `task` rejects.
    task_attempts: int = 2
    # The job exits non-zero when one failure reason (an exception, a failed task, a dead worker)
    # covers more than this share of the inputs: the machinery is broken, not the data.
    max_failure_share: float = 0.1
    # Local Ray size when the job starts one (0: every CPU of the machine).
    local_num_cpus: int = 0
    progress: bool = True


@dataclass
class DataJobConfig:
    profile: str = "tiny"
    input: str = DEFAULT_INPUT
    output: str = "outputs/data"
    seed: int = 0
    ingest: IngestConfig = field(default_factory=IngestConfig)
    faces: FacesConfig = field(default_factory=FacesConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    iqa: IqaConfig = field(default_factory=IqaConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @classmethod
    def for_profile(cls, profile: str) -> DataJobConfig:
        """The tiny profile makes 256-px crops so the CPU demo trains on small frames."""
        config = cls(profile=profile)
        if profile == "tiny":
            config.align.size = 256
        return config


def validate(config: DataJobConfig) -> None:
    """Value ranges the schema cannot express, checked before any work (`run_job(validate=...)`)."""
    most = config.ingest.max_segment_s
    rules: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
        ("ingest.fps", lambda v: v > 0, "a number > 0"),
        ("ingest.sample_rate", lambda v: v > 0, "an integer > 0"),
        ("ingest.min_segment_s", lambda v: 0 < v <= most, f"seconds in (0, ingest.max_segment_s={most}]"),
        ("ingest.shot_width", lambda v: v >= 16, "an integer >= 16"),
        ("ingest.min_side", lambda v: v >= 1, "an integer >= 1"),
        ("ingest.max_duration_s", lambda v: v > 0, "seconds > 0"),
        ("faces.stride", lambda v: v >= 1, "an integer >= 1"),
        ("faces.detect_size", lambda v: v >= 64, "an integer >= 64"),
        ("faces.max_missing", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
        ("faces.max_multi_face", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
        ("align.size", lambda v: v >= 32 and v % 2 == 0, "an even integer >= 32"),
        ("iqa.threshold", lambda v: 0 <= v <= 100, "a score in [0, 100]"),
        ("write.crf", lambda v: 0 <= v <= 51, "an integer in 0..51"),
        ("write.inputs_per_task", lambda v: v >= 1, "an integer >= 1"),
        ("write.shard_max_samples", lambda v: v >= 0, "an integer >= 0 (0: no limit)"),
        ("score.max_offset", lambda v: v >= 0, "frames >= 0"),
        ("execution.num_cpus_per_task", lambda v: v > 0, "a number > 0"),
        ("split.heldout_fraction", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
        ("execution.ingest_num_gpus", lambda v: v >= 0, "a number >= 0"),
        ("execution.score_num_gpus", lambda v: v >= 0, "a number >= 0"),
        ("execution.task_attempts", lambda v: v >= 1, "an integer >= 1"),
        ("execution.max_failure_share", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    )
    for key, allowed, text in rules:
        value = functools.reduce(getattr, key.split("."), config)
        if not allowed(value):
            raise ConfigError(f"config key '{key}' is {value}; allowed values: {text}")
