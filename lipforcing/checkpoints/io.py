"""Reading state dicts from the files public checkpoints ship as, from any fsspec URL.

Accepts a single .safetensors file, a .pth / .pt / .bin torch file, a sharded safetensors index
(`*.safetensors.index.json`), or a folder holding one of these; a local path or a URL (`s3://...`).
Local files are memory-mapped; remote ones are read into memory. Nothing is fetched implicitly:
a missing path is an error that names it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load, load_file
from torch import Tensor

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_state_dict(url: str | Path) -> dict[str, Tensor]:
    fs, path = fsspec.core.url_to_fs(str(url))
    if not fs.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {url}")
    if fs.isdir(path):
        return read_state_dict(_pick_file(fs, path))
    if path.endswith(".index.json"):
        weight_map = json.loads(fs.cat_file(path))["weight_map"]
        folder = path.rsplit("/", 1)[0]
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_state_dict(fs.unstrip_protocol(f"{folder}/{shard}")))
        return state
    local = isinstance(fs, LocalFileSystem)
    if path.endswith(".safetensors"):
        return load_file(path) if local else load(fs.cat_file(path))
    if path.endswith(TORCH_SUFFIXES):
        source = path if local else io.BytesIO(fs.cat_file(path))
        state = torch.load(source, map_location="cpu", weights_only=True)
        return state["state_dict"] if isinstance(state.get("state_dict"), dict) else state
    raise ValueError(f"unsupported checkpoint format: {url} (expected .safetensors, .pth, or an index .json)")


def _pick_file(fs: fsspec.AbstractFileSystem, folder: str) -> str:
    """The checkpoint inside a folder: a sharded index first, then a lone weights file."""
    names = sorted(fs.ls(folder, detail=False))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    files = [n for n in names if n.endswith(".safetensors")] or [
        n for n in names if n.endswith(TORCH_SUFFIXES)
    ]
    if indexes:
        return fs.unstrip_protocol(indexes[0])
    if len(files) != 1:
        found = ", ".join(n.rsplit("/", 1)[-1] for n in files) or "nothing"
        raise FileNotFoundError(
            f"expected one weights file or a *.safetensors.index.json in {folder}, found {found}"
        )
    return fs.unstrip_protocol(files[0])


def strip_prefix(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """Drop a wrapper prefix (e.g. `module.`) when every key carries it."""
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return state
