"""Loading `taew2_1.pth` (madebyollin/taehv) into `TinyAutoencoder` by its original key names."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from lipforcing.checkpoints.io import read_state_dict
from lipforcing.models.tae import TGrow, TinyAutoencoder


def fit_tgrow(tae: TinyAutoencoder, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint TGrow with more output frames than ours keeps its last frames' channels.

    (The same rule TAEHV uses when a temporal upsampling stage is switched off.)
    """
    state = dict(state)
    for i, layer in enumerate(tae.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in state:
            rows = layer.conv.weight.shape[0]
            if state[key].shape[0] > rows:
                state[key] = state[key][-rows:]
    return state


def load_tae(path: str | Path, channels: list[int] | tuple[int, ...] = (256, 128, 64, 64)) -> TinyAutoencoder:
    """A TinyAutoencoder with weights from a taew2_1-layout .pth / .safetensors file or URL (strict)."""
    try:
        state = read_state_dict(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"TAE weights not found: {path} (model.tae_weights)") from err
    tae = TinyAutoencoder(channels)
    tae.load_state_dict(fit_tgrow(tae, state))
    return tae.eval()
