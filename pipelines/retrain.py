"""`make retrain`: one scheduled retraining cycle, safe to run again at any time.

    python -m pipelines.retrain date=2026-11-30 input=s3://raw/ root=s3://runs/retrain

A cycle:
  1. data: the data job on `input`, incrementally, into the one output `<root>/data` (only raw files
     not yet committed are processed); nothing new to ingest since the last finished cycle -> the
     job says so and does nothing;
  2. distill: a fresh, run-dated output `<root>/runs/<run>/` and run name `retrain-<run>` (`<run>` is
     the date, `<date>.2`... when a day has several cycles), fine-tuning the current
     `<registered_name>@champion` with DMD from the teacher it was distilled with (no champion yet: the full
     teacher -> student -> DMD distillation). The student is registered as `@challenger`;
  3. eval: challenger and champion on the same held-out split (`<root>/data/heldout`), with the same
     SyncNet version, seed and settings;
  4. gate: `promotion` (pipelines/promotion.py) decides whether the challenger becomes `@champion`;
     the decision, its reason and both sets of numbers go to an MLflow run `retrain` and to the
     challenger's version tags.

`<root>/retrain.json` records each cycle; a cycle that died part-way is resumed by the next run
(the data and distill jobs resume themselves; a finished eval is not redone). `dry_run=true` says what
a run would do and changes nothing. Extra settings reach each job through `data_args`,
`distill_args` and `eval_args` (dot-list overrides, e.g. `distill_args=[dmd.train.steps=100]`).

With `input` empty (the embedded default) the job stands in for a bucket receiving uploads: the
embedded sample arrives in two uploads, the next one each time the previous one has been trained on
(all its held-out identities come with the first, so both cycles are judged on the same split).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mlflow

from data_jobs.config import DEFAULT_INPUT, DataJobConfig
from data_jobs.config import validate as validate_data
from data_jobs.job import plan_ingest
from lipforcing import storage
from lipforcing.config import ClusterConfig, ConfigError
from pipelines import lineage, promotion, tracking
from pipelines.jobs import resolve_config, run_job

STATE_FILE = "retrain.json"
ENCODER_WEIGHTS = ("vae_weights", "tae_weights", "audio_encoder_weights", "text_embedding", "negative_text_embedding")
log = logging.getLogger("lipforcing.retrain")


@dataclass
class RetrainConfig:
    profile: str = "tiny"
    date: str = ""  # YYYY-MM-DD, what the scheduler passes as the run date; "" = today (UTC)
    input: str = ""  # raw uploads, a folder or list as `make data` reads; "" = the embedded sample's uploads
    root: str = "outputs/retrain"  # <root>/data, <root>/runs/<run>/, <root>/retrain.json
    registered_name: str = "lipforcing-student"  # the registered student whose @champion this job maintains
    # The SyncNet of the DMD reward and of both evals (a registered one is pinned to its version when
    # the cycle first needs it, so the two evals cannot disagree on it)
    syncnet_weights: str = "models:/syncnet@champion"
    data_args: list[str] = field(default_factory=list)  # extra overrides of the data job
    distill_args: list[str] = field(default_factory=list)  # ... of the distill job
    eval_args: list[str] = field(default_factory=list)  # ... of both evals
    promotion: promotion.PromotionRule = field(default_factory=promotion.PromotionRule)
    force: bool = False  # run a cycle even when there is nothing new to train on
    abandon: bool = False  # mark an unfinished cycle abandoned (one that cannot finish) instead of resuming it
    dry_run: bool = False  # say what this run would do; change nothing
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# Keys each job gets from the cycle itself: an override of one would bypass the gate or break resume.
OWNED = {
    "data_args": ("input", "output"),
    "distill_args": ("data", "output", "run_name", "stages", "student.weights", "dmd.syncnet", "dmd.registered_name",
                     "dmd.registered_alias", "seed"),
    "eval_args": ("student_weights", "syncnet_weights", "output", "seed"),
}  # fmt: skip


def validate(config: RetrainConfig) -> None:
    """The run date, the rule, and every job's overrides, before any work (a bad key in
    `distill_args` must not surface after an hour of ingest)."""
    from pipelines.distill import validate as validate_distill
    from pipelines.distill_config import DistillConfig
    from pipelines.evaluate import EvalConfig

    run_date(config)
    promotion.validate_rule(config.promotion, "promotion")
    if not config.input and not storage.is_local(config.root):
        raise ConfigError(f"config key 'input' is empty (the embedded sample, on this machine's disk) while 'root' is "
                          f"{config.root!r}: give the raw uploads' object-storage URL")  # fmt: skip
    for key, schema in (("data_args", DataJobConfig), ("distill_args", DistillConfig), ("eval_args", EvalConfig)):
        owned = [item for item in getattr(config, key) if item.split("=", 1)[0] in OWNED[key]]
        if owned:
            raise ConfigError(f"config key '{key}' sets {owned}, which the cycle sets itself; allowed: other keys of the job")
        try:
            resolved = resolve_config(schema, [f"profile={config.profile}", *getattr(config, key)])
            if schema is DistillConfig:  # e.g. pretrained weights a real profile needs (the data comes later)
                validate_distill(resolved, check_data=False)
        except ConfigError as err:
            raise ConfigError(f"config key '{key}': {err}") from None


def run_date(config: RetrainConfig) -> str:
    if not config.date:
        return datetime.datetime.now(datetime.UTC).date().isoformat()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", config.date):
            return datetime.date.fromisoformat(config.date).isoformat()
    except ValueError:
        pass
    raise ConfigError(f"config key 'date' is {config.date!r}; allowed values: a date YYYY-MM-DD (the run date) or empty for today")


class State:
    """`<root>/retrain.json`: every cycle, what it made and what was decided."""

    def __init__(self, root: str):
        self.url = storage.join(root, STATE_FILE)
        self.values: dict[str, Any] = json.loads(storage.read_text(self.url)) if storage.exists(self.url) else {}
        self.cycles: list[dict[str, Any]] = self.values.setdefault("cycles", [])

    def save(self) -> None:
        storage.write_text(self.url, json.dumps(self.values, indent=1))

    def unfinished(self) -> dict[str, Any] | None:
        return next((c for c in self.cycles if c["status"] == "running"), None)

    def last_finished(self) -> dict[str, Any] | None:
        return next((c for c in reversed(self.cycles) if c["status"] == "done"), None)

    def new_run(self, date: str, root: str) -> str:
        """`date`, or `date.N` when this date already has a cycle (in the state or a folder under `runs/`:
        a reused folder would have its stages skipped as done)."""
        names = (date if n == 1 else f"{date}.{n}" for n in range(1, len(self.cycles) + 1000))
        taken = {c["run"] for c in self.cycles}
        return next(name for name in names if name not in taken and not storage.exists(storage.join(root, "runs", name)))


class Cycle:
    """One retraining cycle's configs and locations."""

    def __init__(self, config: RetrainConfig, record: dict[str, Any]):
        from pipelines.distill_config import DistillConfig

        self.config, self.record, self.run = config, record, record["run"]
        self.folder = storage.join(config.root, "runs", self.run)
        self.data = data_config(config, record["input"])
        # both evals read the encoders the students were trained with (the distill job's model.* weights)
        model = resolve_config(DistillConfig, [f"profile={config.profile}", *config.distill_args]).model
        self.encoders = [f"model.{key}={getattr(model, key)}" for key in ENCODER_WEIGHTS if getattr(model, key)]

    def distill_args(self, champion: str, syncnet: str) -> list[str]:
        """Fine-tune the champion from the teacher it was distilled with; no champion: distill in full."""
        args = [f"profile={self.config.profile}", f"data={self.data.output}", f"output={storage.join(self.folder, 'distill')}",
                f"run_name=retrain-{self.run}", f"dmd.syncnet={syncnet}", f"dmd.registered_name={self.config.registered_name}",
                "dmd.registered_alias=", f"seed={self.data.seed}"]  # fmt: skip
        if champion:
            args += ["stages=[dmd]", f"student.weights={champion}", f"teacher.weights={self.record['teacher']}"]
        return args + list(self.config.distill_args)

    def eval_args(self, student: str, syncnet: str, side: str) -> list[str]:
        return [f"profile={self.config.profile}", f"student_weights={student}", f"syncnet_weights={syncnet}",
                f"data={storage.join(self.data.output, 'heldout')}", f"output={storage.join(self.folder, 'eval', side)}",
                f"seed={self.data.seed}", *self.encoders, *self.config.eval_args]  # fmt: skip


def champion_teacher(config: RetrainConfig, champion: str) -> str:
    """The teacher the champion was distilled with: its pinned registry version, else its location
    (`teacher.weights` in `distill_args` wins); a ConfigError before any work when unknown."""
    given = resolve_config_value(config.distill_args, "teacher.weights")
    if given:
        return given
    tags = tracking.find_version(champion, "registered_name").tags
    teacher = tags.get(f"{lineage.UPSTREAM}teacher.version", "")
    teacher = f"models:/{teacher}" if teacher else tags.get(f"{lineage.UPSTREAM}teacher", "")
    if not teacher:
        raise ConfigError(f"{champion} records no teacher (tag upstream.teacher): give distill_args=[teacher.weights=...]")
    return teacher


def resolve_config_value(overrides: list[str], key: str) -> str:
    """The value `overrides` give `key` ("" when none does)."""
    return next((item.split("=", 1)[1] for item in reversed(overrides) if item.split("=", 1)[0] == key), "")


def data_config(config: RetrainConfig, raw: str) -> DataJobConfig:
    data = resolve_config(DataJobConfig, [f"profile={config.profile}", f"input={raw}", f"output={storage.join(config.root, 'data')}", *config.data_args])
    validate_data(data)
    return data


def pending_inputs(data: DataJobConfig, listing: str) -> tuple[int, int]:
    """(raw inputs listed, inputs of tasks not yet ingested) of the data job's next run, with the
    inputs read from `listing` (the job's `input`, or a dry run's preview of it)."""
    from data_jobs.inputs import list_inputs
    from pipelines.data import ingest_config

    items, _, _, tasks = plan_ingest(ingest_config(data), list_inputs(listing, data.split))
    return len(items), sum(len(task.items) for task in tasks)


def deliver_sample_upload(inbox: str, delivered: int, trained: bool) -> int:
    """The embedded default's uploads into the list `inbox`: the sample's list cut in two (everything
    but the VoxCeleb2 clips, then those), the next one only once the last was `trained` on. Returns
    how many uploads have arrived."""
    import pandas as pd

    from data_jobs.job import prepare_input

    if delivered >= 2 or (delivered and not trained):
        return delivered
    prepare_input(resolve_config(DataJobConfig, [f"input={DEFAULT_INPUT}"]))  # generates the sample once
    sample = pd.read_csv(DEFAULT_INPUT, keep_default_na=False)
    folder = storage.absolute(DEFAULT_INPUT).rsplit("/", 1)[0]
    for column in ("video", "audio"):
        sample[column] = [f"{folder}/{path}" if path else "" for path in sample[column]]
    arrived = sample[sample["dataset"] != "voxceleb2"] if delivered == 0 else sample
    storage.write_text(inbox, arrived.to_csv(index=False))
    log.info("embedded default: upload %d of the sample arrived in %s", delivered + 1, inbox)
    return delivered + 1


def raw_inputs(config: RetrainConfig, state: State, scratch: str) -> tuple[str, str]:
    """(the data job's `input`, where to list it now): `input`, or the embedded default's inbox after
    its next upload (a dry run lists a preview of that inbox in `scratch`, leaving the real one and
    the state alone)."""
    if config.input:
        return config.input, config.input
    inbox = storage.join(config.root, "inbox.csv")
    delivered, trained = state.values.get("uploads_delivered", 0), state.last_finished() is not None
    if not config.dry_run:
        state.values["uploads_delivered"] = deliver_sample_upload(inbox, delivered, trained)
        return inbox, inbox
    preview = storage.join(scratch, "inbox.csv")
    if storage.exists(inbox):
        storage.write_bytes(preview, storage.read_bytes(inbox))
    deliver_sample_upload(preview, delivered, trained)
    return inbox, preview


def retrain(config: RetrainConfig) -> int:
    validate(config)
    tracking.setup_tracking()
    state = State(config.root)
    record = state.unfinished()
    if record is not None and config.abandon:
        record.update(status="abandoned", finished=_now())
        state.save()
        print(f"retrain: cycle {record['run']} abandoned; the next run plans a new one")
        return 0
    if record is not None:
        print(f"retrain: cycle {record['run']} did not finish; {'would resume' if config.dry_run else 'resuming'} it")
        if config.dry_run:
            return 0
    else:
        record = plan_cycle(config, state)
        if record is None:
            return 0
    return run_cycle(config, state, record)


def plan_cycle(config: RetrainConfig, state: State) -> dict[str, Any] | None:
    """A new cycle's record, or None (and the reason printed) when there is nothing to do or it is a dry run."""
    date = run_date(config)
    if config.input and not storage.exists(config.input):
        raise ConfigError(f"config key 'input' is {config.input!r}, which does not exist")
    with tempfile.TemporaryDirectory(prefix="lipforcing-retrain-") as scratch:
        raw, listing = raw_inputs(config, state, scratch)
        data = data_config(config, raw)
        listed, pending = pending_inputs(data, listing) if storage.exists(listing) else (0, 0)
    source = config.input or f"{storage.join(config.root, 'inbox.csv')} (the embedded sample's uploads)"
    last = state.last_finished()
    champion = promotion.current_champion(config.registered_name)
    if not pending and last is not None and not config.force:
        print(f"retrain: nothing new in {source} ({listed} inputs, all ingested) since cycle {last['run']} "
              f"({last['decision']}): nothing to do (force=true runs a cycle anyway)")  # fmt: skip
        return None
    run = state.new_run(date, config.root)
    teacher = champion_teacher(config, f"models:/{config.registered_name}/{champion}") if champion else ""
    if config.dry_run:
        start = f"fine-tune models:/{config.registered_name}/{champion} (@champion) with DMD" if champion else "distill a student in full (no champion yet)"
        rule = config.promotion
        print(f"retrain (dry run): cycle {run} would ingest {pending} new of {listed} inputs from {source} into {data.output}, "
              f"{start} into {storage.join(config.root, 'runs', run)}, evaluate the challenger"
              f"{' and the champion' if champion else ''} on {storage.join(data.output, 'heldout')}, and promote it when "
              f"{'it is the first' if not champion else f'no metric is worse than {rule.tolerances} allows and one of {rule.better_any} is better'} "
              f"(mode {rule.mode})")  # fmt: skip
        return None
    record = {"run": run, "date": date, "input": raw, "status": "running", "started": _now(), "champion_before": champion,
              "teacher": teacher, "force": config.force}  # fmt: skip
    state.cycles.append(record)
    state.save()
    return record


def run_cycle(config: RetrainConfig, state: State, record: dict[str, Any]) -> int:
    from pipelines.data import log_data_run, report_failure, run_data
    from pipelines.distill import run_distill
    from pipelines.distill_config import DistillConfig
    from pipelines.evaluate import heldout_shards

    cycle = Cycle(config, record)
    if "manifest_sha256" not in record:  # once past the data step, a resumed cycle keeps its data (and held-out split)
        log.info("retrain cycle %s: data", cycle.run)
        summary = run_data(cycle.data)
        record["data_run"] = log_data_run(cycle.data, summary)
        if summary.failure:
            return report_failure(summary)
        record["manifest_sha256"] = lineage.data_lineage(cycle.data.output).manifest_sha256
        last = state.last_finished()
        if last is not None and last.get("manifest_sha256") == record["manifest_sha256"] and not record.get("force"):
            reason = "the new inputs added no training sample (rejected, or all held out: see the data run)"
            with decision_run(config, record, "no_new_samples", reason):
                pass
            return finish(state, record, "no_new_samples", reason, config)
        heldout_shards(storage.join(cycle.data.output, "heldout"))  # no held-out split: stop before training
        state.save()
    champion_version = record["champion_before"]
    champion = f"models:/{config.registered_name}/{champion_version}" if champion_version else ""
    syncnet = pinned_syncnet(cycle, state)
    if not record.get("challenger"):
        log.info("retrain cycle %s: distill (%s)", cycle.run, f"fine-tune {champion}" if champion else "from scratch")
        distill = resolve_config(DistillConfig, cycle.distill_args(champion, syncnet))
        version = run_distill(distill)
        if version is None:
            raise RuntimeError(f"{distill.output} holds a DMD student that was never registered (the cycle died between "
                               "the two); remove its dmd/ folder and rerun to train it again")  # fmt: skip
        record["challenger"] = str(version)
        state.save()
    challenger = f"models:/{config.registered_name}/{record['challenger']}"
    scores = {side: evaluated(cycle, uri, syncnet, side) for side, uri in (("challenger", challenger), ("champion", champion)) if uri}
    decision = promotion.decide(scores["challenger"], scores.get("champion"), config.promotion)
    now = promotion.current_champion(config.registered_name)
    if decision.promote and now != champion_version:
        reason = f"@champion moved during the cycle (version {champion_version or 'none'} then, {now} now): not promoted"
        decision = promotion.Decision(False, reason, decision.challenger, decision.champion)
    with decision_run(config, record, decision.verdict, decision.reason):
        mlflow.log_params({"challenger": challenger, "champion": champion or "none", "syncnet": syncnet})
        promotion.record(decision, config.registered_name, record["challenger"], champion_version)
    record.update(challenger_metrics=finite(decision.challenger), champion_metrics=finite(decision.champion))
    return finish(state, record, decision.verdict, decision.reason, config)


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics JSON can hold (NaN is not JSON)."""
    return {key: value for key, value in metrics.items() if math.isfinite(value)}


@contextlib.contextmanager
def decision_run(config: RetrainConfig, record: dict[str, Any], decision: str, reason: str) -> Iterator[None]:
    """The cycle's MLflow run `retrain`, which says what was decided and why (`retrain.*` tags)."""
    tags = {"job": "retrain", "retrain.run": record["run"], "retrain.date": record["date"],
            "retrain.decision": decision, "retrain.reason": reason[:5000]}  # fmt: skip
    with tracking.start_run("retrain", config=config, tags=tags) as run:
        mlflow.log_param("data_run", record["data_run"])
        record["mlflow_run"] = run.info.run_id
        yield


def pinned_syncnet(cycle: Cycle, state: State) -> str:
    """The SyncNet both evals and the reward use (`syncnet_weights`; a registered one pinned to the
    version it names once the cycle's data is in), saved so a resumed cycle uses the same one."""
    if not cycle.record.get("syncnet"):
        uri = cycle.config.syncnet_weights
        if uri.startswith("models:/"):
            version = tracking.find_version(uri, "syncnet_weights")
            uri = f"models:/{version.name}/{version.version}"
        cycle.record["syncnet"] = uri
        state.save()
    return cycle.record["syncnet"]


def evaluated(cycle: Cycle, student: str, syncnet: str, side: str) -> dict[str, float]:
    """The eval's mean and set metrics for `student` (an eval already written by this cycle is read back)."""
    from pipelines.evaluate import EvalConfig, evaluate

    config = resolve_config(EvalConfig, cycle.eval_args(student, syncnet, side))
    report_url = storage.join(config.output, "report.json")
    report = json.loads(storage.read_text(report_url)) if storage.exists(report_url) else {}
    if report.get("student") != student:
        log.info("retrain cycle %s: eval of the %s %s", cycle.run, side, student)
        evaluate(config)
        report = json.loads(storage.read_text(report_url))
    untrained = [key for key in report["random_init"] if key != "dit_weights"]  # the student's weights are given apart
    if untrained and config.profile != "tiny":
        raise ConfigError(f"the {side}'s eval ran with random-init {untrained}: no gate decides on those numbers; "
                          "give the encoders' weights (distill_args or eval_args model.*)")  # fmt: skip
    return {**report["mean"], **report["set_metrics"]}


def finish(state: State, record: dict[str, Any], decision: str, reason: str, config: RetrainConfig) -> int:
    record.update(status="done", finished=_now(), decision=decision, reason=reason)
    state.save()
    champion = promotion.current_champion(config.registered_name)
    print(f"retrain cycle {record['run']}: {decision}: {reason}. @champion is "
          f"{f'models:/{config.registered_name}/{champion}' if champion else 'unset'}")  # fmt: skip
    return 0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(run_job("pipelines.retrain", RetrainConfig, retrain, validate=validate))
