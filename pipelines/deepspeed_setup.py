"""DeepSpeed configuration from a `TrainerConfig`: the one place its JSON schema is spelled out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pipelines.trainer import TrainerConfig


def deepspeed_config(config: TrainerConfig, world_size: int, lr: float, grad_clip: float | None = None) -> dict[str, Any]:
    """ZeRO stage, precision, AdamW (decoupled weight decay), clipping and gradient accumulation.

    No DeepSpeed scheduler: the trainer sets each iteration's learning rate itself, because a
    DeepSpeed schedule counts a network's own optimizer steps, and DMD's student steps only every
    fifth iteration.
    """
    ds = _common(config, world_size)
    ds.update(
        {
            "gradient_accumulation_steps": config.grad_accum,
            "train_batch_size": config.batch_size * config.grad_accum * world_size,
            "gradient_clipping": config.grad_clip if grad_clip is None else grad_clip,
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
        }
    )
    return ds


def frozen_deepspeed_config(config: TrainerConfig, world_size: int) -> dict[str, Any]:
    """An engine without optimizer for a frozen network: ZeRO-3 partitions its weights, bf16 casts them."""
    return _common(config, world_size)


def _common(config: TrainerConfig, world_size: int) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": config.batch_size * world_size,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": False},
    }
    if config.zero_stage == 3:
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": True})
    return ds


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
