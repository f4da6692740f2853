"""One held-out clip through the analysis: the teacher's runs decoded and scored step by step.

Runs as a Ray task (on a GPU when the cluster has one); returns plain numbers, so the driver never
holds a model or a latent.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from data_jobs.media import to_uint8
from lipforcing.analysis.scoring import MouthFidelity
from lipforcing.analysis.trajectory import teacher_trajectories, two_call_grid
from lipforcing.data.encode import LatentEncoder
from lipforcing.data.windows import lower_face_mask
from lipforcing.metrics.fid import load_torchscript
from lipforcing.models import build_tae, build_teacher
from lipforcing.models.syncnet import SyncNetConfig, load_syncnet, score_clip
from pipelines.analyze.config import AnalyzeConfig
from pipelines.evaluate.clips import EvalClip

DECODE_BATCH = 8  # latents decoded per call


def grid_key(s0: float, s1: float, j1: int) -> str:
    """A two-call grid cell as a JSON key."""
    return f"{s0:g}/{s1:g}/{j1}"


class ClipScorer:
    """The models one task needs, built once: encoder, teacher, decoder, SyncNet, fidelity metric."""

    def __init__(self, config: AnalyzeConfig, teacher_path: str, syncnet_path: str, device: torch.device):
        self.config, self.device = config, device
        self.encoder = LatentEncoder(config.model, config.window, device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.teacher = build_teacher(config.model, device=device, dtype=dtype, weights=teacher_path).eval()
        self.decoder = self.encoder.vae if config.decoder == "vae" else build_tae(config.model).to(device).eval()
        self.syncnet = load_syncnet(SyncNetConfig(weights=syncnet_path), key="syncnet_weights").to(device)
        lpips = load_torchscript(config.lpips_weights, "lpips_weights", device) if config.lpips_weights else None
        mouth = 1 - lower_face_mask(config.window.size, config.window.mask_box)[0, 0]
        self.fidelity = MouthFidelity(mouth.to(device), lpips)

    @torch.no_grad()
    def score(self, latents: Tensor, clip: EvalClip) -> list[dict[str, float]]:
        """latents [N, 16, F, h, w] -> per latent: mouth fidelity, Sync-C and Sync-D of its frames."""
        rows = []
        for start in range(0, len(latents), DECODE_BATCH):
            frames = self.decoder.decode(latents[start : start + DECODE_BATCH].float()).clamp(0, 1).cpu()
            for video in frames:
                video = video[: len(clip.video)]
                sync = score_clip(self.syncnet, to_uint8(video), clip.audio.numpy())
                rows.append({"fidelity": self.fidelity(video, clip.video), "sync_c": sync.confidence, "sync_d": sync.min_dist})
        return rows

    @torch.no_grad()
    def __call__(self, index: int, clip: EvalClip) -> dict[str, Any]:
        """The clip's curves: per ODE step with and without CFG, per two-call grid cell, and its source.
        A 65-channel teacher's reference sequence is the clip's frames half its length later (wrapped):
        as in training, never the very frames it is scored against."""
        model = self.config.model
        video = clip.video[None]
        batch = {
            "video": video,
            "reference": video[:, :1],
            "reference_sequence": video.roll(-(video.shape[1] // 2), dims=1) if model.use_reference_sequence else None,
            "audio": clip.audio[None],
        }
        cond = self.encoder.condition(batch)
        null_cond = cond.null(self.encoder.negative_text)
        frames = cond.masked_video.shape[2]
        size = self.config.window.size // 8
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed + index)
        noise = torch.randn((1, model.latent_channels, frames, size, size), generator=generator, device=self.device)
        runs = teacher_trajectories(self.teacher, noise, cond, null_cond, model.guidance_scale, model.teacher_steps, model.shift)
        grid = two_call_grid(self.teacher, noise, cond, null_cond, self.config.scales, self.config.landing_range(),
                             model.teacher_steps, model.shift)  # fmt: skip
        cells = list(grid)
        scored_grid = self.score(torch.cat([grid[c] for c in cells]), clip)
        source = score_clip(self.syncnet, to_uint8(clip.video), clip.audio.numpy())
        return {
            "index": index,
            "key": clip.key,
            "plain": self.score(runs.plain[:, 0], clip),
            "guided": self.score(runs.guided[:, 0], clip),
            "grid": {grid_key(*cell): row for cell, row in zip(cells, scored_grid)},
            "source": {"sync_c": source.confidence, "sync_d": source.min_dist},
        }


def analyze_clips(config: AnalyzeConfig, teacher_path: str, syncnet_path: str, clips: list[tuple[int, EvalClip]]) -> list[dict[str, Any]]:
    """A Ray task's share of the (index, clip) pairs, with its models built once."""
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    scorer = ClipScorer(config, teacher_path, syncnet_path, torch.device("cuda" if use_cuda else "cpu"))
    return [scorer(index, clip) for index, clip in clips]
