"""Entry points that turn a profile into ready models: the teacher, the student and their helpers."""

from __future__ import annotations

import torch

from lipforcing.checkpoints.tae import load_tae
from lipforcing.checkpoints.wan import load_dit_checkpoint
from lipforcing.models.causal import CausalWanModel
from lipforcing.models.config import ModelConfig, resolve_config
from lipforcing.models.seeding import seeded
from lipforcing.models.tae import TinyAutoencoder
from lipforcing.models.wan import WanModel


def _build(
    cls: type[WanModel],
    profile: str | ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    weights: str | None,
) -> WanModel:
    cfg = resolve_config(profile)
    with torch.device("meta"):
        model = cls(cfg).to(dtype)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    with seeded(cfg.seed, device):
        model.init_weights()
    path, adapter = (cfg.dit_weights, cfg.dit_adapter or None) if weights is None else (weights, None)
    if path:
        try:
            load_dit_checkpoint(model, path, adapter, cfg.dit_adapter_alpha)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err} (model.dit_weights / model.dit_adapter)") from err
    elif adapter:
        raise ValueError("model.dit_adapter is set but model.dit_weights is empty: an adapter loads on top of its Wan 2.1 base")
    return model


def build_teacher(
    profile: str | ModelConfig = "tiny",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: str | None = None,
) -> WanModel:
    """The bidirectional DiT. Weights: `weights` (a merged checkpoint), else cfg.dit_weights with
    cfg.dit_adapter merged on top, else random (seeded by cfg.seed).

    On the meta device nothing is allocated or loaded (for parameter counts and sharded init).
    """
    return _build(WanModel, profile, device, dtype, weights)


def build_student(
    profile: str | ModelConfig = "tiny",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: str | None = None,
) -> CausalWanModel:
    """The causal student: same names and weights as the teacher, plus block-causal and streaming modes."""
    return _build(CausalWanModel, profile, device, dtype, weights)


def build_tae(profile: str | ModelConfig = "tiny", path: str | None = None) -> TinyAutoencoder:
    """taew2_1 from `path` / cfg.tae_weights, or a random TAE of the profile's widths."""
    cfg = resolve_config(profile)
    path = cfg.tae_weights if path is None else path
    if path:
        return load_tae(path, cfg.tae_channels)
    with seeded(cfg.seed):
        return TinyAutoencoder(cfg.tae_channels, cfg.latent_channels).eval()
