"""LoRA adapters (peft) on the DiT: q, k, v, o, ffn.0, ffn.2 of every block, rank 128 / alpha 64.

Adapters are injected in place (the model keeps its class and forward); the audio modules and the
patch embedding stay fully trainable, everything else is frozen. `export_state_dict` gives merged
weights under the original Wan key names, so an adapted model exports as a plain checkpoint.
"""

from __future__ import annotations

import re

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

FULLY_TRAINABLE = ("patch_embedding", "audio_proj", "audio_cond_projs")


def lora_target_pattern(targets: list[str]) -> str:
    """A regex matching block submodules named by their last path parts, e.g. `q` or `ffn.0`."""
    names = "|".join(re.escape(t) for t in targets)
    return rf"^blocks\.\d+\.(?:.*\.)?(?:{names})$"


def apply_lora(
    model: nn.Module,
    rank: int | None = None,
    alpha: int | None = None,
    targets: list[str] | None = None,
    fully_trainable: tuple[str, ...] = FULLY_TRAINABLE,
) -> nn.Module:
    """Inject fresh LoRA adapters (B = 0, so outputs are unchanged) and set what trains.

    rank / alpha / targets default to the model's config (128 / 64 / q,k,v,o,ffn.0,ffn.2).
    """
    cfg = model.cfg
    config = LoraConfig(
        r=cfg.lora_rank if rank is None else rank,
        lora_alpha=cfg.lora_alpha if alpha is None else alpha,
        lora_dropout=0.0,
        target_modules=lora_target_pattern(cfg.lora_targets if targets is None else targets),
    )
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or name.split(".")[0] in fully_trainable
    return model


def adapted_parameter_count(
    model: nn.Module, rank: int, targets: list[str], fully_trainable: tuple[str, ...] = FULLY_TRAINABLE
) -> int:
    """How many parameters `apply_lora` would make trainable, without injecting anything (works on
    meta-device models of any size): r * (in + out) per targeted Linear plus the fully trained modules."""
    pattern = re.compile(lora_target_pattern(targets))
    adapters = sum(
        rank * (m.in_features + m.out_features) for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.match(name)
    )
    return adapters + sum(p.numel() for name, p in model.named_parameters() if name.split(".")[0] in fully_trainable)


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def merge_lora(model: nn.Module) -> None:
    """Fold the adapters into the base weights (for fast inference); undo with `unmerge_lora`."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def remove_lora(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the plain base layers back (e.g. before a stage adds a fresh LoRA)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    return model


def export_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Merged weights under the original Wan key names (no `base_layer`, no `lora_` entries)."""
    merge_lora(model)
    try:
        return {
            name.replace(".base_layer", ""): tensor.detach().clone()
            for name, tensor in model.state_dict().items()
            if "lora_" not in name
        }
    finally:
        unmerge_lora(model)


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only what trains (adapters + fully trainable modules): the small stage checkpoint."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
