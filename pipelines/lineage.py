"""What made what: datasets and upstream models recorded in MLflow, and the chain read back.

A data job's output is a dataset: where it lies, the data job's config hash (what shaped it), the
dataset tags of its manifest, the manifest's sha256 (the exact rows) and its sample count. The data
run logs it as an MLflow dataset (`mlflow.log_input`, context "output", and "heldout" for the held-out
split); a training run logs the dataset it read (context "training") and the upstream models it used
(`upstream.<role>` tags: teacher, SyncNet); a registered model version carries its training data's
lineage (`lineage.*` tags). `chain` follows a model version back to the raw data:

    model version -> training run -> dataset (digest) -> data run -> preprocessing hash -> raw input
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import mlflow
import pandas as pd
import yaml

from data_jobs.config import DataJobConfig
from data_jobs.job import Layout, data_config_hash
from lipforcing import storage
from lipforcing.config import load_config
from pipelines import tracking

LINEAGE = "lineage."  # prefix of the lineage tags on a model version and params on its run
UPSTREAM = "upstream."  # prefix of the tags naming the models a training run started from or used
DIGEST_CHARS = 32  # MLflow keeps at most 36 characters of a dataset digest


@dataclass(frozen=True)
class DataLineage:
    """What a data job's output holds: the data a model was trained on, or the data being scored."""

    data: str  # where it was read
    data_config_hash: str = ""  # the data job's config hash (what shaped the data), from its config.yaml
    datasets: tuple[str, ...] = ()  # sorted `dataset` values of its manifest
    manifest_sha256: str = ""  # the exact rows it held
    samples: int = field(default=0, compare=False)  # rows of its manifest (the sha256 identifies them)

    def fields(self) -> dict[str, str]:
        """The known identifying fields as strings (datasets as a JSON list)."""
        values = {"data": self.data, "data_config_hash": self.data_config_hash,
                  "datasets": json.dumps(list(self.datasets)) if self.datasets else "",
                  "manifest_sha256": self.manifest_sha256}  # fmt: skip
        return {name: value for name, value in values.items() if value}

    def tags(self) -> dict[str, str]:
        return {LINEAGE + name: value for name, value in self.fields().items()}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> DataLineage | None:
        """The lineage in a model version's tags; None when it has none (registered before lineage)."""
        values = {name.removeprefix(LINEAGE): value for name, value in tags.items() if name.startswith(LINEAGE)}
        if not values.get("data_config_hash") and not values.get("datasets"):
            return None
        return cls(values.get("data", ""), values.get("data_config_hash", ""),
                   tuple(json.loads(values.get("datasets") or "[]")), values.get("manifest_sha256", ""))  # fmt: skip

    @property
    def digest(self) -> str:
        """The MLflow dataset digest: the manifest's sha256, shortened to what MLflow stores."""
        return self.manifest_sha256[:DIGEST_CHARS]

    def dataset(self, name: str):
        """This data as an MLflow dataset (metadata only: the shards stay where they are)."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource, S3ArtifactDatasetSource

        source = LocalArtifactDatasetSource(self.data) if storage.is_local(self.data) else S3ArtifactDatasetSource(self.data)
        return MetaDataset(source=source, name=name, digest=self.digest or None)


def data_lineage(output: str, split: str = "train") -> DataLineage:
    """The lineage of one shard set of a data job's output (final or aligned; `split` "heldout" for
    its held-out set) from the job's `config.yaml` and the set's `manifest.parquet`; a field stays
    empty when its file is missing (shards copied without their tables)."""
    layout = Layout(output)
    data = layout.set_root(split)
    location = storage.absolute(data)
    digest = ""
    written = _read_if_present(layout.file("config.yaml"))
    if written is not None:
        digest = data_config_hash(load_config(DataJobConfig, lenient_files=[yaml.safe_load(written) or {}]))
    datasets: tuple[str, ...] = ()
    sha, samples = "", 0
    raw = _read_if_present(storage.join(data, "manifest.parquet"))
    if raw is not None:
        sha = hashlib.sha256(raw).hexdigest()
        column = pd.read_parquet(io.BytesIO(raw), columns=["dataset"])["dataset"]
        datasets, samples = tuple(sorted(column.dropna().unique())), len(column)
    return DataLineage(location, digest, datasets, sha, samples)


def _read_if_present(url: str) -> bytes | None:
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        return None


def log_dataset(lineage: DataLineage, context: str) -> None:
    """Log `lineage` as a dataset input of the active run (`context`: output, heldout, training, eval),
    named by its last path part, with the sample count and config hash beside it."""
    name = os.path.basename(lineage.data.rstrip("/")) or lineage.data
    tags = {"samples": str(lineage.samples), "format": "webdataset", **lineage.fields()}
    mlflow.log_input(lineage.dataset(name), context=context, tags=tags)


def log_upstream(role: str, uri: str, key: str) -> tuple[dict[str, str], str]:
    """Tag the active run with a model it uses (`role`: teacher, syncnet) as given (config key `key`)
    and, for a registered model, the version its alias points at now. Returns the tags and the URI to
    use from here on: that version pinned (`models:/name/N`), so an alias moved while the job runs
    changes neither what it uses nor what it recorded."""
    tags, pinned = {UPSTREAM + role: uri}, uri
    if uri.startswith("models:/"):
        version = tracking.find_version(uri, key)
        tags[f"{UPSTREAM}{role}.version"] = f"{version.name}/{version.version}"
        pinned = f"models:/{version.name}/{version.version}"
    mlflow.set_tags(tags)
    return tags, pinned


def chain(model_uri: str) -> list[dict[str, Any]]:
    """The chain behind a registered model version, newest link first: the version, the run that made
    it, the dataset it read, the data run that produced that dataset (by digest), its preprocessing
    config hash and raw input. Links that cannot be found end the chain (e.g. shards made before
    lineage was logged)."""
    client = mlflow.tracking.MlflowClient()
    version = tracking.registered_version(model_uri)
    links: list[dict[str, Any]] = [{"link": "model version", "name": version.name, "version": version.version,
                                    "upstream": {k: v for k, v in version.tags.items() if k.startswith(UPSTREAM)}}]  # fmt: skip
    run = client.get_run(version.run_id)
    parent_id = run.data.tags.get("mlflow.parentRunId")
    job_run = client.get_run(parent_id) if parent_id else run
    links.append({"link": "training run", "run_id": job_run.info.run_id, "name": job_run.info.run_name,
                  "stage_run_id": run.info.run_id,
                  "upstream": {k: v for k, v in job_run.data.tags.items() if k.startswith(UPSTREAM)}})  # fmt: skip
    inputs = [i for i in job_run.inputs.dataset_inputs if _context(i) == "training"]
    if not inputs:
        return links
    dataset = inputs[0].dataset
    links.append({"link": "dataset", "name": dataset.name, "digest": dataset.digest,
                  "source": json.loads(dataset.source).get("uri", dataset.source), **_input_tags(inputs[0])})  # fmt: skip
    producers = mlflow.search_runs(
        experiment_ids=[job_run.info.experiment_id],
        filter_string=f"tags.job = 'data' and dataset.digest = '{dataset.digest}' and dataset.context = 'output'",
        order_by=["start_time DESC"], output_format="list", max_results=1,
    )  # fmt: skip
    if not producers:
        return links
    data_run = producers[0]
    links.append({"link": "data run", "run_id": data_run.info.run_id,
                  "data_config_hash": data_run.data.tags.get("data_config_hash", ""),
                  "input": data_run.data.params.get("input", "")})  # fmt: skip
    return links


def _context(dataset_input) -> str:
    return {tag.key: tag.value for tag in dataset_input.tags}.get("mlflow.data.context", "")


def _input_tags(dataset_input) -> dict[str, str]:
    return {tag.key: tag.value for tag in dataset_input.tags if not tag.key.startswith("mlflow.")}
