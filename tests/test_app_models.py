"""The app's model cache (no browser needed): the last used versions stay loaded, the oldest goes."""

from __future__ import annotations

import pytest

from pipelines.app import LoadedModels, main


def test_the_app_keeps_the_last_used_models_loaded_and_unloads_the_oldest(capsys):
    loads: list[str] = []
    models = LoadedModels(2, lambda uri: loads.append(uri) or f"model {uri}")
    for uri in ["v1", "v2", "v1", "v3", "v1", "v2"]:
        assert models[uri] == f"model {uri}"
    assert loads == ["v1", "v2", "v3", "v2"]  # v1 was used just before v3 came, so v2 went; then v3 went
    assert list(models.models) == ["v1", "v2"]

    def broken(uri: str) -> str:
        raise OSError(f"cannot load {uri}")

    models.load = broken
    with pytest.raises(OSError):
        models["v9"]
    assert list(models.models) == ["v1", "v2"]  # a failed load unloads nothing
    assert main(["loaded_models=0"]) == 2 and "'loaded_models'" in capsys.readouterr().err
