"""cluster/: the manifests parse, and every job command they run is a valid lipforcing command line."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from lipforcing.config import load_config
from pipelines.jobs import resolve_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
MANIFESTS = sorted(CLUSTER.rglob("*.yaml"))
SCHEMAS = {
    "pipelines.data": ("data_jobs.config", "DataJobConfig"),
    "pipelines.distill": ("pipelines.distill_config", "DistillConfig"),
    "pipelines.retrain": ("pipelines.retrain", "RetrainConfig"),
}
RUN_DATE = "$(date -u +%F)"  # what a scheduled command passes as `date=`; its shell expands it
WEEK_AGO = "$(date -u -d '-7 days' +%F)"


def expand_dates(command: str) -> str:
    """The command as its shell would run it on 2026-11-30."""
    return command.replace(RUN_DATE, "2026-11-30").replace(WEEK_AGO, "2026-11-23")


def entrypoints(document: dict) -> list[str]:
    """Every job command line in a manifest: RayJob `entrypoint:`s and container `args` that run one."""
    found = []
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found += [v for k, v in node.items() if k == "entrypoint"]
            found += [a for a in node.get("args", []) if isinstance(a, str) and a.startswith("python -m")]
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


@pytest.mark.parametrize("path", [p for p in MANIFESTS if "python -m pipelines" in p.read_text()], ids=lambda p: p.name)
def test_entrypoints_resolve_against_the_job_schemas(path, monkeypatch):
    monkeypatch.chdir(CLUSTER.parent)  # entrypoints run in the repository root, as in the image
    commands = entrypoints(yaml.safe_load(path.read_text()))
    assert commands
    read: list[str] = []  # the datasets a job would open before submitting: none exist here
    for entrypoint in commands:
        for command in entrypoint.split("&&"):
            words = shlex.split(expand_dates(command))
            assert words[:2] == ["python", "-m"], command
            module, args = words[2], words[3:]
            if module == "pipelines.compare":  # the report after a scheduled retrain: no profile, no Ray
                from pipelines.compare import CompareConfig
                from pipelines.compare import validate as validate_compare

                report = load_config(CompareConfig, overrides=list(args))
                validate_compare(report)
                assert report.output.startswith("s3://") and report.since == "2026-11-23"
                continue
            schema_module, schema_name = SCHEMAS[module]
            job = importlib.import_module(module)
            config = resolve_config(getattr(importlib.import_module(schema_module), schema_name), args)
            assert config.profile in ("1.3b", "14b")
            if hasattr(job, "validate"):
                if hasattr(job, "check_readable"):
                    monkeypatch.setattr(job, "check_readable", lambda location, fields, key: read.append(location))
                job.validate(config)  # e.g. distill: every pretrained weight it needs is given
                assert all(location.startswith("s3://") for location in read), read  # object storage on a cluster
            if module == "pipelines.retrain":  # a schedule passes the day it fires as the run date
                assert f"date={RUN_DATE}" in command and config.date == "2026-11-30"
                assert config.input.startswith("s3://") and config.root.startswith("s3://")


def test_the_cron_line_runs_a_valid_retrain_command(monkeypatch):
    """cluster/retrain.cron: five schedule fields, then a command whose retrain arguments resolve."""
    monkeypatch.chdir(CLUSTER.parent)
    line = next(row for row in (CLUSTER / "retrain.cron").read_text().splitlines() if row and row[0].isdigit())
    schedule, command = line.split(None, 5)[:5], line.split(None, 5)[5]
    assert schedule == kuberay_documents()["raycronjob-retrain.yaml"]["spec"]["schedule"].split()
    assert "date=$(date -u +\\%F)" in command  # cron would end the command at an unescaped %
    words = shlex.split(command.split(">>")[0].replace("$(date -u +\\%F)", "2026-11-30"))
    start = words.index("-m")
    assert words[start + 1] == "pipelines.retrain"
    from pipelines.retrain import RetrainConfig, validate

    config = resolve_config(RetrainConfig, words[start + 2 :])
    validate(config)
    assert config.profile == "1.3b" and config.date == "2026-11-30" and config.root.startswith("s3://")


def kuberay_documents() -> dict[str, dict]:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted((CLUSTER / "kuberay").glob("*.yaml"))}


def pod_specs(document: dict) -> list[tuple[str, dict, int]]:
    """(group, pod spec, replicas) of every pod template a manifest defines, wherever it sits."""
    spec = document["spec"]
    if document["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]["spec"]
    if document["kind"] == "CronJob":
        return [("submit", spec["jobTemplate"]["spec"]["template"]["spec"], 1)]
    cluster = spec.get("rayClusterSpec", spec)
    groups = [("head", cluster["headGroupSpec"]["template"]["spec"], 1)]
    groups += [(g["groupName"], g["template"]["spec"], g["replicas"]) for g in cluster["workerGroupSpecs"]]
    return groups


def test_every_kuberay_manifest_runs_the_image_kustomize_names():
    kustomization = yaml.safe_load((CLUSTER / "kuberay" / "kustomization.yaml").read_text())
    manifests = {name: doc for name, doc in kuberay_documents().items() if "kind" in doc and doc["kind"] != "Kustomization"}
    assert set(kustomization["resources"]) == set(manifests)
    assert [image["name"] for image in kustomization["images"]] == ["lipforcing"]
    paths = yaml.safe_load((CLUSTER / "kuberay" / "kustomizeconfig.yaml").read_text())["images"]
    for name, document in manifests.items():
        for _, pod, _ in pod_specs(document):
            assert {c["image"] for c in pod["containers"]} == {"lipforcing"}, name
        assert document["kind"] == "CronJob" or any(p["kind"] == document["kind"] for p in paths), name
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())["docker"]["image"]
    assert launcher.rsplit(":", 1)[0] == kustomization["images"][0]["newName"]


def test_gpu_pods_tolerate_gpu_taints_and_have_shared_memory_for_the_loaders():
    for name, document in kuberay_documents().items():
        if "kind" not in document or document["kind"] == "Kustomization":
            continue
        for group, pod, _ in pod_specs(document):
            gpus = int(pod["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            if not gpus:
                continue
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod.get("tolerations", []), (name, group)
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
            volume = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])
            size = volume["emptyDir"]["sizeLimit"]
            assert volume["emptyDir"]["medium"] == "Memory" and int(size.removesuffix("Gi")) >= 8 * gpus, (name, group, size)


@pytest.mark.parametrize("name", ["rayjob-distill.yaml", "raycronjob-retrain.yaml"])
def test_gpu_count_matches_the_profile_the_job_trains(name, monkeypatch):
    """The cluster a distill job brings up has GPUs its profile's stages can use: every stage runs one
    worker per GPU (num_workers unset) and its effective batch divides over them."""
    monkeypatch.chdir(CLUSTER.parent)
    document = kuberay_documents()[name]
    gpus = sum(int(pod["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) * replicas
               for _, pod, replicas in pod_specs(document))  # fmt: skip
    command = next(c for e in entrypoints(document) for c in e.split("&&") if "pipelines.distill" in c or "pipelines.retrain" in c)
    args = shlex.split(expand_dates(command))[3:]
    if "pipelines.retrain" in command:  # the distill job a retrain cycle runs
        from pipelines.retrain import RetrainConfig

        retrain = resolve_config(RetrainConfig, args)
        args = [f"profile={retrain.profile}", *retrain.distill_args]
    from pipelines.distill_config import DistillConfig

    config = resolve_config(DistillConfig, args)
    from pipelines.trainer import accumulation

    for stage in ("teacher", "student", "dmd"):
        train = getattr(config, stage).train
        assert train.num_workers in (None, gpus) and train.effective_batch
        assert accumulation(train, gpus) * train.batch_size * gpus == train.effective_batch


def test_the_raycronjob_says_what_it_needs_and_has_a_fallback():
    text = (CLUSTER / "kuberay" / "raycronjob-retrain.yaml").read_text()
    assert "alpha in KubeRay 1.6" in text and "--feature-gates=RayCronJob=true" in text and "cronjob-retrain.yaml" in text
    fallback = kuberay_documents()["cronjob-retrain.yaml"]
    assert fallback["kind"] == "CronJob" and fallback["spec"]["schedule"] == kuberay_documents()["raycronjob-retrain.yaml"]["spec"]["schedule"]


def test_the_dockerfile_installs_the_pinned_torch_for_its_cuda():
    dockerfile = (CLUSTER.parent / "Dockerfile").read_text()
    pyproject = (CLUSTER.parent / "pyproject.toml").read_text()
    pin = re.search(r'"torch==([0-9.]+)"', pyproject)[1]
    assert f"torch=={pin} --index-url https://download.pytorch.org/whl/cu128" in dockerfile
    assert re.search(r"^FROM nvidia/cuda:12\.8\.\d+-", dockerfile, re.M)  # the CUDA the wheel was built for
    assert "python3.11" in dockerfile and "pip install -e ." in dockerfile
