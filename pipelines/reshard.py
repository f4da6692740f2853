"""Moving a DeepSpeed checkpoint between world sizes: a run stopped on N workers continues on M.

A ZeRO checkpoint holds one optimizer shard per data-parallel rank (one weight shard too under
ZeRO-3), cut for the world size it was written at, and DeepSpeed's ordinary `load_checkpoint`
refuses any other world size. Its universal checkpoint format stores each parameter's fp32 weight,
Adam moments and step count whole, and every rank of any world size cuts its own shard from it on
load. This module converts a saved engine folder to that format once and loads it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import io
import logging
import os
import re
import shutil
import tempfile
from typing import Any

import torch

UNIVERSAL_SUFFIX = "_universal"  # the converted copy of tag T is the folder T_universal
log = logging.getLogger(__name__)
_SHARD = re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_\d+_mp_rank_00_optim_states\.pt$")


def saved_world_size(engine_dir: str, tag: str) -> int:
    """The data-parallel world size the checkpoint `engine_dir/tag` was written at.

    Under ZeRO 1-3 each rank writes one optimizer shard (`bf16_`-prefixed in bf16), so their count
    is that size, read without opening a file. ZeRO-0 writes no shards: its one
    model-states file holds the whole optimizer and loads at any world size; the size is then the
    `dp_world_size` DeepSpeed recorded there (memory-mapped, so the weights are not read).
    """
    shards = _optimizer_shards(os.path.join(engine_dir, tag))
    if shards:
        return len(shards)
    files = sorted(glob.glob(os.path.join(engine_dir, tag, "*mp_rank_00_model_states.pt")))
    if not files:
        raise FileNotFoundError(f"no DeepSpeed checkpoint files in {os.path.join(engine_dir, tag)}")
    state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    return int(state["dp_world_size"])


def to_universal(engine_dir: str, tag: str, universal_dir: str | None = None, workers: int = 1) -> str:
    """Convert `engine_dir/tag` to DeepSpeed's universal format once; returns the converted folder,
    `<universal_dir>/<tag>_universal`, where `universal_dir` defaults to `engine_dir`.

    Pass `universal_dir` where the checkpoint folder must stay untouched (Ray asks that of
    `Checkpoint.as_directory`): a folder for this one engine's checkpoint, since a converted folder
    already there is taken as its conversion (and every engine saves under the same tag). The pinned DeepSpeed's own converter does the work,
    with `workers` processes (one by default: it runs beside training processes that want the CPU).
    It writes into a private folder renamed into place when complete, so a crash leaves no
    half-converted copy, and an exclusive lock lets the first of the processes on one machine
    convert while the others wait for it and reuse its result.
    """
    root = engine_dir if universal_dir is None else universal_dir
    universal = tag + UNIVERSAL_SUFFIX
    target = os.path.join(root, universal)
    if os.path.isdir(target):
        return target
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{universal}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(target):
            return target
        from deepspeed.checkpoint import ds_to_universal

        staging = tempfile.mkdtemp(prefix=f".{universal}-", dir=root)
        try:
            output = os.path.join(staging, universal)  # the converter also writes staging/latest_universal
            args = argparse.Namespace(
                input_folder=os.path.join(engine_dir, tag),
                output_folder=output,
                num_extract_workers=workers,
                num_merge_workers=workers,
                keep_temp_folder=False,
                strict=True,
                # ZeRO 1-2 files lack `universal_checkpoint_info` (DeepSpeed writes it only for a
                # module that declares it, as Megatron's do); without tensor parallelism the
                # converter's default, a bare version number, is all it needs.
                inject_missing_state=True,
            )
            report = io.StringIO()  # its progress, line by line, and tqdm's bars
            with contextlib.redirect_stdout(report), contextlib.redirect_stderr(report):
                ds_to_universal.main(args)
            log.debug("%s", report.getvalue())
            try:
                os.rename(output, target)
            except OSError:
                if not os.path.isdir(target):  # not a lost race (a lock on a filesystem that ignores it)
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_resharded(
    engine: Any, engine_dir: str, tag: str, universal_dir: str | None = None
) -> dict[str, Any]:
    """Load `engine_dir/tag` into `engine`, whatever world size it was written at; returns the
    client state given to `save_checkpoint` (plus DeepSpeed's own extra keys, as `load_checkpoint`).

    At the saving world size, or without per-rank optimizer shards (ZeRO-0), DeepSpeed's ordinary
    load applies. Otherwise the checkpoint is converted to the universal format (see
    `to_universal`, which `universal_dir` is passed to) and loaded with the engine's
    `checkpoint.load_universal` switched on for this one call: DeepSpeed reads that setting at load
    time only, so an engine built without it needs no rebuild. The universal copy keeps the
    model-states files, hence the client state, global step count and Adam step.

    A universal load restores only what the optimizer steps: it skips the module's state dict, so
    persistent buffers and frozen parameters keep their values from construction (logged).
    """
    source = os.path.join(engine_dir, tag)
    if not _optimizer_shards(source) or saved_world_size(engine_dir, tag) == engine.seq_dp_world_size:
        path, client_state = engine.load_checkpoint(engine_dir, tag=tag)
    else:
        universal = to_universal(engine_dir, tag, universal_dir)
        skipped = _outside_optimizer(engine.module)
        if skipped:
            log.warning(  # stages build frozen weights from the same pretrained files, so they match
                "a universal checkpoint load leaves %d frozen tensors or buffers as constructed (e.g. %s)",
                len(skipped),
                ", ".join(skipped[:3]),
            )
        config = engine._config
        previous = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            path, client_state = engine.load_checkpoint(
                os.path.dirname(universal), tag=os.path.basename(universal)
            )
        finally:
            config.load_universal_checkpoint = previous
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint to load in {source}")
    return client_state


def _optimizer_shards(folder: str) -> list[str]:
    """The per-rank ZeRO optimizer files of a checkpoint folder (none under ZeRO-0)."""
    return [name for name in os.listdir(folder) if _SHARD.match(name)] if os.path.isdir(folder) else []


def _outside_optimizer(module: torch.nn.Module) -> list[str]:
    """Names of the persistent buffers and frozen parameters of `module`: state a universal load skips."""
    names = [name for name, param in module.named_parameters() if not param.requires_grad]
    for prefix, submodule in module.named_modules():
        for name, _ in submodule.named_buffers(recurse=False):
            if name not in submodule._non_persistent_buffers_set:
                names.append(f"{prefix}.{name}" if prefix else name)
    return names
