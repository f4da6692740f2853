"""Loaders for real public checkpoints by their original key names."""

from lipforcing.checkpoints.io import read_state_dict, strip_prefix
from lipforcing.checkpoints.tae import fit_tgrow, load_tae
from lipforcing.checkpoints.wan import (
    LoadReport,
    diffusers_to_wan,
    expand_input_channels,
    is_diffusers_layout,
    load_dit_checkpoint,
)

__all__ = [
    "LoadReport",
    "diffusers_to_wan",
    "expand_input_channels",
    "fit_tgrow",
    "is_diffusers_layout",
    "load_dit_checkpoint",
    "load_tae",
    "read_state_dict",
    "strip_prefix",
]
