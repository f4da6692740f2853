"""The fixed text condition: one prompt ("a person talking") encoded once and cached.

Real profiles read a cached UMT5-XXL embedding [L, 4096] from a .safetensors / .pt file (made once
with `encode_prompt`); the tiny profile uses a random fixed tensor drawn from a seed. Either way the
embedding is zero-padded to text_len tokens, as Wan does before its text_embedding MLP.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load, save
from torch import Tensor

from lipforcing.models.config import ModelConfig

TEXT_KEY = "text_embedding"
log = logging.getLogger("lipforcing")


def pad_text(embedding: Tensor, text_len: int) -> Tensor:
    """[L, D] -> [text_len, D], zero-padded (or truncated)."""
    out = embedding.new_zeros(text_len, embedding.shape[-1])
    n = min(text_len, embedding.shape[0])
    out[:n] = embedding[:n]
    return out


def save_text_embedding(embedding: Tensor, url: str) -> None:
    """Cache an encoded prompt [L, D] as a one-tensor .safetensors file (local path or URL)."""
    with fsspec.open(url, "wb") as f:
        f.write(save({TEXT_KEY: embedding.contiguous()}))


def load_text_embedding(url: str, text_len: int) -> Tensor:
    """A cached embedding (`save_text_embedding`'s .safetensors, or a .pt tensor) from a path or URL,
    padded to [text_len, D]."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"text embedding not found: {url} (model.text_embedding)")
    data = fs.cat_file(path)
    tensor = (
        load(data)[TEXT_KEY]
        if path.endswith(".safetensors")
        else torch.load(io.BytesIO(data), weights_only=True)
    )
    return pad_text(tensor.float(), text_len)


def text_embeddings(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """(positive, negative) fixed text embeddings [text_len, text_dim] for a profile.

    With no paths configured, both are random N(0, 1) tensors from cfg.seed (the tiny profile's way).
    """
    if cfg.text_embedding:
        pos = load_text_embedding(cfg.text_embedding, cfg.text_len)
        neg = (
            load_text_embedding(cfg.negative_text_embedding, cfg.text_len)
            if cfg.negative_text_embedding
            else None
        )
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        pos = torch.randn(cfg.text_len, cfg.text_dim, generator=g)
        neg = torch.randn(cfg.text_len, cfg.text_dim, generator=g)
    if neg is None:
        # The released recipe's negative is the UMT5 encoding of the empty prompt, a stored tensor;
        # zeros (all padding) are only a stand-in, and CFG's null branch then differs from training's.
        log.warning(
            "model.negative_text_embedding is empty: the CFG null branch uses a zero text embedding; give the "
            "cached encoding of the empty prompt (encode_prompt('', ...)) the teacher was trained with"
        )
        neg = torch.zeros_like(pos)
    if pos.shape[-1] != cfg.text_dim:
        raise ValueError(f"text embedding width {pos.shape[-1]} != model.text_dim {cfg.text_dim}")
    return pos, neg


@torch.no_grad()
def encode_prompt(prompt: str, encoder_path: str, text_len: int = 512) -> Tensor:
    """Encode a prompt with a local UMT5 encoder folder (e.g. Wan2.1-T2V-1.3B-Diffusers/text_encoder).

    Returns [tokens, 4096] for the real tokens only (Wan trims padding, then zero-pads to text_len).
    The tokenizer is read from a sibling `tokenizer` folder or the encoder folder itself.
    """
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = Path(encoder_path)
    if not folder.exists():
        raise FileNotFoundError(f"text encoder not found: {encoder_path}")
    tok_dir = folder.parent / "tokenizer" if (folder.parent / "tokenizer").exists() else folder
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    encoder = UMT5EncoderModel.from_pretrained(folder, local_files_only=True).eval()
    ids = tokenizer(prompt, max_length=text_len, truncation=True, return_tensors="pt")
    hidden = encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    return hidden[0, : int(ids.attention_mask.sum())].float()
