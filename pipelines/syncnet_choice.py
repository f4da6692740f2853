"""Which SyncNet the data job's score pass uses, and why, so that it is never a surprise.

A SyncNet only knows the faces, crops and audio it was trained on: a toy one trained on the embedded
sample rejects every segment of real footage. So `make syncnet` tags each registered version with the
lineage of its training data (`lineage.*`: where the data was, the data job's config hash, the sorted
dataset tags of its manifest, the manifest's sha256), and before scoring the data job resolves
`score.syncnet` on the driver and compares that lineage with the aligned shards it is about to score:

- of this data: the training data's config hash equals this data's, or its dataset tags are exactly
  this data's (the same datasets ingested with other settings) -> used;
- foreign: both differ, or a registered version carries no lineage (what it learned from is unknown)
  -> refused, unless `score.allow_foreign_syncnet=true`;
- a file given by path (the public syncnet_v2.model) has no lineage: a general-purpose SyncNet,
  used as given.

With nothing usable (none found, or a refused one) a SyncNet is trained on these aligned shards when
`score.train_if_missing=true`, else the job stops before scoring with a ConfigError. The choice is
logged, written to `<output>/syncnet.json` beside the shards, and logged to the data run in MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

from data_jobs.config import DataJobConfig
from lipforcing import storage
from lipforcing.config import ConfigError
from pipelines import tracking
from pipelines.lineage import DataLineage, data_lineage

KEY = "score.syncnet"
CHOICE_FILE = "syncnet.json"

log = logging.getLogger("lipforcing.data")


def same_data(trained_on: DataLineage | None, scored: DataLineage) -> tuple[bool, str]:
    """(whether a SyncNet trained on `trained_on` is of the data `scored`, the reason in words)."""
    if trained_on is None:
        return False, "carries no lineage tags: the data it was trained on is unknown"
    if trained_on.data_config_hash and trained_on.data_config_hash == scored.data_config_hash:
        return True, f"trained on this data (data config hash {scored.data_config_hash})"
    if trained_on.datasets and trained_on.datasets == scored.datasets:
        return True, f"trained on these datasets {list(scored.datasets)} (other ingest settings)"
    return False, (
        f"was trained on other data: {trained_on.data} (data config hash {trained_on.data_config_hash or '?'}, "
        f"datasets {list(trained_on.datasets)}), while this job scores data config hash "
        f"{scored.data_config_hash or '?'}, datasets {list(scored.datasets)}"
    )


@dataclass(frozen=True)
class SyncNetChoice:
    """The SyncNet a score pass uses: what was asked for, what it resolved to, and why it was taken."""

    uri: str  # as configured, or models:/syncnet/<version> for one trained here
    version: str  # the registered version; "" for a file given by path
    weights: str  # the file every score worker loads
    reason: str
    lineage: DataLineage | None = None  # what it was trained on, when known

    def record(self) -> dict[str, Any]:
        """A plain dict for `syncnet.json`, the data run's params and `summary.json`."""
        values = dataclasses.asdict(self)
        values["lineage"] = self.lineage.fields() if self.lineage else {}
        return values


class ForeignSyncNet(Exception):
    """A SyncNet trained on other data than the data to score (see the module docstring)."""


def choose_syncnet(config: DataJobConfig, aligned: str) -> SyncNetChoice:
    """The SyncNet to score the aligned shards at `aligned` with, resolved here on the driver: the
    configured one when usable, else one trained on these shards (`score.train_if_missing`), else a
    ConfigError naming the keys that change the outcome. Logs the choice."""
    tracking.setup_tracking()  # the registry the jobs register into, not MLflow's default store
    scored = data_lineage(aligned)
    try:
        choice = _configured(config, scored)
    except (FileNotFoundError, ForeignSyncNet) as err:
        unusable = str(err)
        if not config.score.train_if_missing:
            raise ConfigError(
                f"{unusable}. Set config key '{KEY}' to syncnet_v2.model or a SyncNet trained on this data, "
                "score.allow_foreign_syncnet=true to score with a SyncNet trained on other data, "
                "score.train_if_missing=true to train one on these shards, or score.enabled=false"
            ) from None
        choice = _train_here(config, aligned, unusable)
    fields = choice.lineage.fields().items() if choice.lineage else ()
    trained_on = "trained on " + ", ".join(f"{name}={value}" for name, value in fields) if fields else "no lineage"
    log.info("score: SyncNet %s (version %s, file %s), %s: %s",
             choice.uri, choice.version or "-", choice.weights, trained_on, choice.reason)  # fmt: skip
    return choice


def _configured(config: DataJobConfig, scored: DataLineage) -> SyncNetChoice:
    """`score.syncnet` resolved and checked; FileNotFoundError when it is missing, ForeignSyncNet when refused."""
    uri = config.score.syncnet
    if not uri.startswith("models:/"):
        weights = tracking.resolve_model_for_workers(uri, config.output, KEY)
        return SyncNetChoice(uri, "", weights, "given by path: a general-purpose SyncNet (e.g. the public syncnet_v2.model), used as given")
    version = tracking.find_version(uri, KEY)
    lineage = DataLineage.from_tags(version.tags)
    matches, why = same_data(lineage, scored)
    if not matches and not config.score.allow_foreign_syncnet:
        raise ForeignSyncNet(f"{uri} (version {version.version}) {why}")
    if not matches:
        why += "; accepted because score.allow_foreign_syncnet=true"
    pinned = f"models:/{version.name}/{version.version}"  # the version checked, even if the alias moves now
    weights = tracking.resolve_model_for_workers(pinned, config.output, KEY)
    return SyncNetChoice(uri, str(version.version), weights, why, lineage)


def _train_here(config: DataJobConfig, aligned: str, unusable: str) -> SyncNetChoice:
    """Train and register a SyncNet on the aligned shards (the embedded default's path)."""
    from pipelines.jobs import resolve_config
    from pipelines.syncnet import REGISTERED_NAME, SyncNetJobConfig, train_and_register

    output = config.score.syncnet_output or storage.join(config.output, "syncnet")
    log.info("score: %s; training a SyncNet on %s first, into %s", unusable, aligned, output)
    syncnet_config = resolve_config(SyncNetJobConfig, [
        f"profile={config.profile}", f"data={aligned}", f"output={output}",
        f"train.steps={config.score.syncnet_steps}", f"seed={config.seed}",
    ])  # fmt: skip
    uri = f"models:/{REGISTERED_NAME}/{train_and_register(syncnet_config)}"
    version = tracking.find_version(uri, KEY)
    reason = f"trained here on these shards, since {unusable}"
    return SyncNetChoice(uri, str(version.version), storage.join(output, "syncnet.pt"), reason, DataLineage.from_tags(version.tags))


def write_choice(output: str, choice: SyncNetChoice) -> None:
    """`<output>/syncnet.json`: which SyncNet scored the shards beside it (kept across reruns that score nothing)."""
    storage.write_text(storage.join(output, CHOICE_FILE), json.dumps(choice.record(), indent=1))


def for_data_run(output: str) -> tuple[dict[str, str], dict[str, str]]:
    """(tags, params) naming the SyncNet that scored the shards at `output`, for the data run in MLflow
    (`syncnet.uri`/`syncnet.version` tags, `syncnet.*` params); the choice goes into `summary.json`
    too, where a reader of the data job's results looks. Empty when none scored (a rerun that scored
    nothing new still names the SyncNet of its shards: `syncnet.json` stays)."""
    url = storage.join(output, CHOICE_FILE)
    if not storage.exists(url):
        return {}, {}
    record = json.loads(storage.read_text(url))
    summary_url = storage.join(output, "summary.json")
    if storage.exists(summary_url):
        summary = json.loads(storage.read_text(summary_url))
        storage.write_text(summary_url, json.dumps({**summary, "syncnet": record}, indent=1))
    tags = {"syncnet.uri": record["uri"], "syncnet.version": record["version"]}
    return tags, tracking.safe_params({"syncnet": record})
