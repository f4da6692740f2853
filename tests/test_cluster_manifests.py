"""cluster/: the manifests parse, and every job command they run is a valid lipforcing command line."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.jobs import resolve_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
MANIFESTS = sorted(CLUSTER.rglob("*.yaml"))
SCHEMAS = {
    "pipelines.data": ("data_jobs.config", "DataJobConfig"),
    "pipelines.distill": ("pipelines.distill_config", "DistillConfig"),
}


def entrypoints(document: dict) -> list[str]:
    """Every `entrypoint:` string anywhere in a manifest."""
    found = []
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found += [v for k, v in node.items() if k == "entrypoint"]
            stack += list(node.values())
        elif isinstance(node, list):
            stack += node
    return found


def test_manifests_exist_and_parse():
    names = {path.relative_to(CLUSTER).as_posix() for path in MANIFESTS}
    assert {"ray-cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-data.yaml",
            "kuberay/rayjob-distill.yaml", "kuberay/raycronjob-retrain.yaml"} <= names  # fmt: skip
    for path in MANIFESTS:
        assert yaml.safe_load(path.read_text()), path


@pytest.mark.parametrize("path", [p for p in MANIFESTS if "entrypoint" in p.read_text()], ids=lambda p: p.name)
def test_entrypoints_resolve_against_the_job_schemas(path, monkeypatch):
    monkeypatch.chdir(CLUSTER.parent)  # entrypoints run in the repository root, as in the image
    commands = entrypoints(yaml.safe_load(path.read_text()))
    assert commands
    for entrypoint in commands:
        for command in entrypoint.split("&&"):
            words = shlex.split(command)
            assert words[:2] == ["python", "-m"], command
            module, args = words[2], words[3:]
            schema_module, schema_name = SCHEMAS[module]
            job = importlib.import_module(module)
            config = resolve_config(getattr(importlib.import_module(schema_module), schema_name), args)
            assert config.profile in ("1.3b", "14b")
            if hasattr(job, "validate"):
                job.validate(config)  # e.g. distill: every pretrained weight it needs is given
