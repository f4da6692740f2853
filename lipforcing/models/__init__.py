"""Model library: the Wan 2.1 DiT teacher, the causal streaming student, audio, text, VAE and TAE.

Names load lazily (PEP 562), so importing one submodule (say `lipforcing.models.syncnet` in a data
job) does not pull in diffusers and transformers.
"""

import importlib

_EXPORTS = {
    "KVCache": "attention",
    "block_causal_mask": "attention",
    "AudioEncoder": "audio",
    "build_audio_encoder": "audio",
    "pack_audio": "audio",
    "build_student": "build",
    "build_tae": "build",
    "build_teacher": "build",
    "CausalWanModel": "causal",
    "Condition": "conditioning",
    "random_condition": "conditioning",
    "PROFILES": "config",
    "ModelConfig": "config",
    "model_config": "config",
    "text_embeddings": "text",
    "WanVAE": "vae",
    "build_vae": "vae",
    "mask_to_latent": "vae",
    "WanModel": "wan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
