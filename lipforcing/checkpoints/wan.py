"""Loading Wan 2.1 / OmniAvatar-LS DiT weights into `WanModel` / `CausalWanModel`.

Two layouts are read: the original Wan checkpoint names (our model's own names, so no renaming) and
diffusers' `WanTransformer3DModel` names, mapped key by key. A 16-channel (text-to-video) checkpoint
grows to our 49/65 input channels with the new channels at zero, and a checkpoint without the audio
modules gets zero audio projections, so right after loading the model computes exactly what the
checkpoint did, whatever the extra inputs.

OmniAvatar (and OmniAvatar-LS) ship an adapter to load on top of the Wan 2.1 base: LoRA pairs
`<module>.lora_A[.default].weight` [r, in] / `<module>.lora_B[.default].weight` [out, r] on q, k, v,
o, ffn.0, ffn.2, merged as W + (alpha / r) B A, plus whole tensors that replace the base's (the audio
modules, the patch embedding widened to 33/49/65 input channels).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lipforcing.checkpoints.io import read_state_dict, strip_prefix

WRAPPER_PREFIXES = ("module.", "model.", "dit.", "pipe.dit.", "_orig_mod.")
AUDIO_PREFIXES = ("audio_proj.", "audio_cond_projs.")
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.default)?\.weight$")

# diffusers name -> original Wan name, applied in order to every key
DIFFUSERS_TO_WAN: list[tuple[str, str]] = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),  # diffusers' norm2 is the affine cross-attention norm
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
]


@dataclass
class LoadReport:
    layout: str  # "wan" or "diffusers"
    expanded: list[str] = field(default_factory=list)  # tensors grown with zero channels
    initialised: list[str] = field(default_factory=list)  # model tensors absent from the checkpoint


def is_diffusers_layout(state: dict[str, Tensor]) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in state)


def diffusers_to_wan(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in DIFFUSERS_TO_WAN:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def expand_input_channels(weight: Tensor, in_channels: int) -> Tensor:
    """Conv3d weight [dim, c, *k] -> [dim, in_channels, *k]: the checkpoint's channels first, new ones zero."""
    if weight.shape[1] > in_channels:
        raise ValueError(
            f"checkpoint patch_embedding has {weight.shape[1]} input channels > model's {in_channels}"
        )
    grown = weight.new_zeros(weight.shape[0], in_channels, *weight.shape[2:])
    grown[:, : weight.shape[1]] = weight
    return grown


def merge_adapter(base: dict[str, Tensor], adapter: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """The base state with an OmniAvatar-format adapter applied: LoRA pairs merged into their weights
    (computed in float32, stored in the base's dtype), every other adapter tensor replacing the base's."""
    adapter = strip_prefix(adapter, WRAPPER_PREFIXES)
    pairs: dict[str, dict[str, Tensor]] = {}
    merged = dict(base)
    for key, value in adapter.items():
        match = LORA_KEY.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["side"]] = value
        else:
            merged[key] = value
    for module, pair in sorted(pairs.items()):
        target = f"{module}.weight"
        if set(pair) != {"A", "B"}:
            raise KeyError(f"adapter has lora_{''.join(pair)} but not its pair for {module}")
        if target not in base:
            raise KeyError(f"adapter LoRA targets {target}, which the base checkpoint lacks")
        down, up = pair["A"].float(), pair["B"].float()
        delta = (alpha / down.shape[0]) * (up @ down)
        if delta.shape != base[target].shape:
            raise ValueError(f"adapter LoRA for {target} gives {tuple(delta.shape)}, base has {tuple(base[target].shape)}")
        merged[target] = (base[target].float() + delta).to(base[target].dtype)
    return merged


def load_dit_checkpoint(
    model: nn.Module,
    source: str | Path | dict[str, Tensor],
    adapter: str | Path | dict[str, Tensor] | None = None,
    adapter_alpha: float = 64.0,
) -> LoadReport:
    """Load DiT weights (path or state dict, either layout) into model; raises on any mismatch.

    `adapter` (an OmniAvatar-format checkpoint) is merged on top of `source` first. Allowed
    differences: fewer patch-embedding input channels (zero-extended) and absent audio modules
    (projections zeroed). A model with LoRA already injected loads into its base layers.
    """
    state = read_state_dict(source) if isinstance(source, str | Path) else dict(source)
    state = strip_prefix(state, WRAPPER_PREFIXES)
    report = LoadReport(layout="diffusers" if is_diffusers_layout(state) else "wan")
    if report.layout == "diffusers":
        state = diffusers_to_wan(state)
    if adapter is not None:
        state = merge_adapter(state, read_state_dict(adapter) if isinstance(adapter, str | Path) else dict(adapter), adapter_alpha)

    target = {k.replace(".base_layer", ""): k for k in model.state_dict()}
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in target)
    missing = sorted(k for k in target if k not in state)
    fatal_missing = [k for k in missing if not k.startswith(AUDIO_PREFIXES)]
    if unexpected or fatal_missing:
        raise KeyError(
            f"checkpoint does not fit the model: unexpected {unexpected[:8]}, missing {fatal_missing[:8]}"
        )

    weight = state.get("patch_embedding.weight")
    if weight is not None and weight.shape[1] != own["patch_embedding.weight"].shape[1]:
        state["patch_embedding.weight"] = expand_input_channels(
            weight, own["patch_embedding.weight"].shape[1]
        )
        report.expanded.append("patch_embedding.weight")

    model.load_state_dict({target[k]: v for k, v in state.items()}, strict=False)
    if any(k.startswith("audio_cond_projs.") for k in missing):
        with torch.no_grad():
            for p in model.audio_cond_projs.parameters():
                p.zero_()
    report.initialised = missing
    return report
