"""DeepSpeed configuration from a `TrainerConfig`: the one place its JSON schema is spelled out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pipelines.trainer import TrainerConfig

# DeepSpeed's scheduler types for our schedule names (all start with a linear warmup).
_SCHEDULERS = {"constant": "WarmupLR", "cosine": "WarmupCosineLR", "linear": "WarmupDecayLR"}


def deepspeed_config(config: TrainerConfig, world_size: int, lr: float) -> dict[str, Any]:
    """ZeRO stage, precision, AdamW (decoupled weight decay), clipping and the LR schedule."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.batch_size * config.grad_accum * world_size,
        "gradient_clipping": config.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's AdamW on torch's kernel: no JIT compile, works on CPU and GPU.
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": list(config.betas),
                "eps": 1e-8,
                "weight_decay": config.weight_decay,
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "scheduler": _scheduler(config, lr),
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": False},
    }
    if config.zero_stage == 3:
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": True})
    return ds


def _scheduler(config: TrainerConfig, lr: float) -> dict[str, Any]:
    warmup = max(config.warmup_steps, 0)
    params: dict[str, Any] = {"warmup_num_steps": max(warmup, 1), "warmup_type": "linear"}
    if config.schedule == "constant":
        params.update({"warmup_min_lr": 0.0 if warmup else lr, "warmup_max_lr": lr})
    elif config.schedule == "linear":
        params.update({"warmup_min_lr": 0.0, "warmup_max_lr": lr, "total_num_steps": max(config.steps, warmup + 1)})
    else:
        params = {
            "total_num_steps": max(config.steps, warmup + 1),
            "warmup_num_steps": max(warmup, 1),
            "warmup_min_ratio": 0.0,
            "cos_min_ratio": 0.0,
        }
    return {"type": _SCHEDULERS[config.schedule], "params": params}


@contextlib.contextmanager
def whole_modules(engines: Iterable[Any]) -> Iterator[None]:
    """Every engine's module with its full weights on every rank and no ZeRO hooks.

    ZeRO-3 keeps only a shard of each parameter on a rank and gathers it around each submodule's
    forward, a collective every rank must join. Exporting weights, rendering sample videos and
    validating on rank 0 need whole, plain modules instead; under ZeRO 0-2 they already are.
    """
    with contextlib.ExitStack() as stack:
        for engine in engines:
            if engine.zero_optimization_stage() == 3:
                stack.enter_context(_unsharded(engine))
        yield


@contextlib.contextmanager
def _unsharded(engine: Any) -> Iterator[None]:
    """DeepSpeed's gather-and-unhook for generation, plus the root module's start-of-forward hook,
    which it leaves in place and which can run a collective check on one rank alone."""
    from deepspeed.runtime.zero import unwrap_model_for_generation

    offload = engine.optimizer.parameter_offload
    root = offload.module
    start_of_forward = root._forward_pre_hooks[offload.fwd_pre_hook.id]
    with unwrap_model_for_generation(engine):
        offload.fwd_pre_hook.remove()
        try:
            yield
        finally:
            offload.fwd_pre_hook = root.register_forward_pre_hook(start_of_forward, prepend=True)


def gathered(parameters: Iterable[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Read access to whole tensors of (possibly ZeRO-3-partitioned) parameters; a no-op otherwise."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters(list(parameters))
