"""`make eval`'s configuration: what is evaluated, with which student and SyncNet, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from data_jobs.config import AlignConfig, FacesConfig
from lipforcing.config import ClusterConfig, ConfigError
from lipforcing.data.windows import WindowConfig
from lipforcing.models.config import ModelConfig

TINY_WARNING = "tiny profile, random-init models: not a quality result"


@dataclass
class EvalConfig:
    profile: str = "tiny"
    # Registered models (models:/name@alias) or paths/URLs. Not `student` / `syncnet`: those names
    # are sections of the shared profile YAML. An empty syncnet_weights skips Sync-C / Sync-D.
    student_weights: str = "models:/lipforcing-student@candidate"  # the distill job's dit.safetensors
    syncnet_weights: str = "models:/syncnet@champion"
    # Held-out shards: the data job writes identities kept out of training to <its output>/heldout
    # (a folder with shards/, or of *.tar).
    data: str = "outputs/data/heldout"
    output: str = "outputs/eval"  # report.json, report.md, samples/, config.yaml
    clips: int = 8  # at most this many clips, in the seed's shard order
    max_frames: int = 0  # evaluate at most this many frames of each clip (0: the whole clip)
    decoder: Literal["tae", "vae"] = "tae"  # streaming decoder
    samples: int = 2  # side-by-side sample videos written and logged
    fid_weights: str = ""  # TorchScript Inception-v3 (inception-2015-12-05.pt); "" skips FID
    fvd_weights: str = ""  # TorchScript I3D (i3d_torchscript.pt); "" skips FVD
    csim_model_pack: str = ""  # InsightFace model-pack folder (buffalo_l), local or s3://; "" skips CSIM
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0  # shard order and the student's sampling noise
    # Also paste each generated crop back into its source frames (the raw input the manifest names,
    # when readable) and score the full frames (SSIM, PSNR), as the paper does.
    full_frame: bool = True
    # own: each clip with its own audio; other: cross-identity, each clip driven by the next clip's audio
    audio_from: Literal["own", "other"] = "own"
    # Long-form mode: whole videos (paths or URLs, each with its own audio track), minutes long, streamed
    # through `make infer`'s passes and scored per `long_form_segment_s` for drift (the paper's 6-minute test)
    long_form: list[str] = field(default_factory=list)
    long_form_segment_s: float = 60.0
    # How the long-form videos' faces are found, as `make infer` finds them (its keys, its defaults)
    shot_threshold: float = 27.0
    faces: FacesConfig = field(default_factory=FacesConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    window: WindowConfig = field(default_factory=WindowConfig)  # size and mask_box are used
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)



def validate(config: EvalConfig) -> None:
    if config.clips < 1:
        raise ConfigError(f"config key 'clips' is {config.clips}; allowed values: an integer >= 1")
    if config.samples < 0:
        raise ConfigError(f"config key 'samples' is {config.samples}; allowed values: an integer >= 0")
    if not config.long_form_segment_s >= 1.0:
        raise ConfigError(f"config key 'long_form_segment_s' is {config.long_form_segment_s}; allowed values: seconds >= 1 (SyncNet needs a second of frames)")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "config key 'device' is 'cuda' but no CUDA device is visible; allowed values: 'auto', 'cpu'"
        )
