"""`make compare`: one report, HTML and Markdown, comparing MLflow runs across experiments.

    python -m pipelines.compare                                     # the latest distill and eval runs
    python -m pipelines.compare tag=job=distill since=2026-01-01 experiments=[lipforcing,sweeps]
    python -m pipelines.compare runs=[<run id>,<run id>] output=outputs/compare-dmd

Top-level runs are selected (a job's stage runs come with it) and compared in `<output>/report.html`
(figures embedded, so the copy logged to MLflow opens on its own) and `report.md` (figures in
`images/`): (1) the metrics of each job's runs, (2) each training stage's loss curves, a line per
run, (3) Sync-C against FVD (SSIM when no run has FVD) of the eval runs, their Pareto frontier and
the paper's operating points, (4) the params that differ, (5) the lineage of the evaluated students
and of the champion, (6) the retrain decisions. The report is logged to an MLflow run `compare`.
Figures are drawn in `compare_plots.py`, the two renderings written by `compare_report.py`.
"""

from __future__ import annotations

import datetime
import itertools
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlflow
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from lipforcing import storage
from lipforcing.config import ConfigError, flatten, load_config
from pipelines import lineage, tracking
from pipelines.compare_plots import (
    PAPER_GROUND_TRUTH_SYNC_C,
    PAPER_POINTS,
    TINY_LABEL,
    FrontierPoint,
    frontier_figure,
    loss_figure,
    pareto_optimal,
)
from pipelines.compare_report import Block, Image, Section, Table, write_report

# Run-level metrics worth a column, in this order (eval: the paper's table; SyncNet: held-out numbers).
KEY_METRICS = ("sync_c", "sync_d", "av_offset", "gt_sync_c", "fvd", "fid", "ssim", "psnr", "mouth_psnr",
               "mouth_l1", "csim", "fps", "ttff_ms", "val_loss", "val_accuracy")  # fmt: skip
DAY_MS = 86_400_000
TITLE = "Lip Forcing: run comparison"


@dataclass
class CompareConfig:
    experiments: list[str] = field(default_factory=lambda: [tracking.EXPERIMENT])
    # key=value filters on run tags: values of one key are alternatives, different keys must all hold
    tag: list[str] = field(default_factory=lambda: ["job=distill", "job=eval"])
    runs: list[str] = field(default_factory=list)  # run ids: exactly these (the filters do not apply)
    since: str = ""  # YYYY-MM-DD: runs started on or after this day (UTC)
    until: str = ""  # YYYY-MM-DD: runs started on or before this day (UTC)
    nested: bool = False  # select stage runs too (e.g. tag=stage=dmd); else they come with their job
    max_runs: int = 20  # the newest that match
    champion: str = "models:/lipforcing-student@champion"  # its lineage is shown when it exists
    output: str = "outputs/compare"  # report.html, report.md, images/


def day_ms(text: str, key: str) -> int:
    """Milliseconds since the epoch at the start of a YYYY-MM-DD day, UTC."""
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"config key '{key}' is {text!r}; allowed values: a date YYYY-MM-DD") from None
    return int(datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp() * 1000)


def validate(config: CompareConfig) -> None:
    if config.max_runs < 1:
        raise ConfigError(f"config key 'max_runs' is {config.max_runs}; allowed values: an integer >= 1")
    if not config.experiments:
        raise ConfigError("config key 'experiments' is empty; allowed values: a list of experiment names")
    bad = [item for item in config.tag if "=" not in item or item.startswith("=") or "'" in item]
    if bad:
        raise ConfigError(f"config key 'tag' has {bad}; allowed values: key=value items (no quotes)")
    for key in ("since", "until"):
        if getattr(config, key):
            day_ms(getattr(config, key), key)


def time_clauses(config: CompareConfig) -> list[str]:
    clauses = [f"attributes.start_time >= {day_ms(config.since, 'since')}"] if config.since else []
    if config.until:
        clauses.append(f"attributes.start_time < {day_ms(config.until, 'until') + DAY_MS}")
    return clauses


def filters(config: CompareConfig) -> list[str]:
    """MLflow filter strings whose matches together are the selection (one per tag alternative)."""
    clauses = time_clauses(config) + ([] if config.nested else ["tags.`mlflow.parentRunId` IS NULL"])
    alternatives: dict[str, list[str]] = {}
    for item in config.tag:
        key, value = item.split("=", 1)
        alternatives.setdefault(key, []).append(f"tags.`{key}` = '{value}'")
    return [" and ".join([*clauses, *chosen]) for chosen in itertools.product(*alternatives.values())]


def experiment_ids(config: CompareConfig, client: MlflowClient) -> list[str]:
    ids = []
    for name in config.experiments:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            known = ", ".join(e.name for e in client.search_experiments())
            raise ConfigError(f"config key 'experiments' names {name!r}, not in the tracking store; it has: {known}")
        ids.append(experiment.experiment_id)
    return ids


def select_runs(config: CompareConfig, client: MlflowClient) -> list[Run]:
    """The runs given by id, in that order; else the newest `max_runs` runs matching the filters."""
    if config.runs:
        try:
            return [client.get_run(run_id) for run_id in config.runs]
        except mlflow.exceptions.MlflowException as err:
            raise ConfigError(f"config key 'runs': {err.message}") from None
    ids = experiment_ids(config, client)
    found = {}
    for where in filters(config):
        for run in client.search_runs(ids, where, order_by=["attributes.start_time DESC"], max_results=config.max_runs):
            found[run.info.run_id] = run
    return sorted(found.values(), key=lambda run: run.info.start_time, reverse=True)[: config.max_runs]


def describe(config: CompareConfig) -> str:
    if config.runs:
        return f"runs {', '.join(config.runs)}"
    parts = [f"experiments {', '.join(config.experiments)}", f"tags {' or '.join(config.tag) or 'any'}"]
    parts += [f"{key} {getattr(config, key)}" for key in ("since", "until") if getattr(config, key)]
    return "; ".join(parts) + ("" if config.nested else "; top-level runs only (nested=true adds stage runs)")


def label(run: Run) -> str:
    return f"{run.info.run_name} {run.info.run_id[:8]}"


def started(run: Run) -> str:
    return datetime.datetime.fromtimestamp(run.info.start_time / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def is_loss(key: str) -> bool:
    return key == "loss" or key.endswith("_loss")


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def job_of(run: Run) -> str:
    return run.data.tags.get("job") or run.data.tags.get("stage") or run.info.run_name


def stage_runs(client: MlflowClient, run: Run) -> list[Run]:
    where = f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
    return client.search_runs([run.info.experiment_id], where, order_by=["attributes.start_time ASC"])


def trained(run: Run, children: list[Run]) -> list[tuple[str, Run]]:
    """(stage, run holding its curves): the stage runs, and the run itself when it logs a loss."""
    sources = [(child.data.tags.get("stage") or child.info.run_name, child) for child in children]
    sources.append((job_of(run), run))
    return [(stage, source) for stage, source in sources if any(map(is_loss, source.data.metrics))]


def row_metrics(run: Run, children: list[Run]) -> dict[str, float]:
    """A run's key metrics and losses, and the last loss of each of its stages as `<stage>.<loss>`."""
    values = {k: v for k, v in run.data.metrics.items() if k in KEY_METRICS or is_loss(k)}
    for stage, source in trained(run, children):
        if source is not run:
            values.update({f"{stage}.{k}": v for k, v in source.data.metrics.items() if is_loss(k)})
    return values


def metrics_tables(runs: list[Run], children: dict[str, list[Run]], experiments: dict[str, str]) -> list[Block]:
    """One table per job, with the columns its runs have."""
    values = {run.info.run_id: row_metrics(run, children[run.info.run_id]) for run in runs}
    blocks: list[Block] = ["Columns stage.loss hold the last value a stage logged; dates are UTC."]
    for job, group in itertools.groupby(sorted(runs, key=job_of), key=job_of):
        group = list(group)
        seen = list(dict.fromkeys(key for run in group for key in values[run.info.run_id]))
        columns = [k for k in KEY_METRICS if k in seen] + [k for k in seen if k not in KEY_METRICS]
        rows = [[run.info.run_name, run.info.run_id, experiments.get(run.info.experiment_id, run.info.experiment_id),
                 started(run), run.info.status, run.data.params.get("profile", "-"),
                 *(number(values[run.info.run_id].get(k)) for k in columns)] for run in group]  # fmt: skip
        blocks += [f"{job} runs ({len(group)}):", Table(["run", "id", "experiment", "started", "status", "profile", *columns], rows)]
    if any(run.data.params.get("profile") == "tiny" and values[run.info.run_id] for run in runs):
        blocks.append(f"Runs of profile tiny: {TINY_LABEL}.")
    return blocks


def curve_figures(client: MlflowClient, runs: list[Run], children: dict[str, list[Run]]) -> list[Block]:
    """A figure per stage (in the order stages first ran), a line per selected run."""
    by_stage: dict[str, dict[str, dict[str, list[tuple[int, float]]]]] = {}  # stage -> loss -> run -> curve
    for run in runs:
        for stage, source in trained(run, children[run.info.run_id]):
            for key in sorted(filter(is_loss, source.data.metrics)):
                history = sorted((m.step, m.value) for m in client.get_metric_history(source.info.run_id, key))
                by_stage.setdefault(stage, {}).setdefault(key, {})[label(run)] = history
    return [Image(f"loss-{re.sub(r'[^A-Za-z0-9_.-]', '_', stage)}.png", loss_figure(stage, curves),
                  f"Stage {stage}: {', '.join(curves)} per iteration, one line per run (log scale when all values are positive).")
            for stage, curves in by_stage.items()]  # fmt: skip


def frontier(runs: list[Run]) -> list[Block]:
    """Sync-C against FVD (else SSIM) of the runs that measured them, with the Pareto-optimal ones."""
    measured = [run for run in runs if "sync_c" in run.data.metrics]
    axis = "fvd" if any("fvd" in run.data.metrics for run in measured) else "ssim"
    plotted = [run for run in measured if axis in run.data.metrics]
    if not plotted:
        return ["No selected eval run has Sync-C with FVD or SSIM: nothing to plot."]
    points = [FrontierPoint(label(run), run.data.metrics["sync_c"], run.data.metrics[axis],
                            run.data.params.get("profile") == "tiny") for run in plotted]  # fmt: skip
    optimal = pareto_optimal([(p.sync_c, p.x) for p in points], lower_x_is_better=axis == "fvd")
    why = "FVD (lower is better)" if axis == "fvd" else "SSIM (higher is better): no selected eval run has FVD (set fvd_weights)"
    paper = "; ".join(f"{name} Sync-C {sync_c}, FVD {fvd}, SSIM {ssim}" for name, sync_c, fvd, ssim in PAPER_POINTS)
    caption = (f"Sync-C (higher is better) against {why}; {len(plotted)} runs, dashed: their Pareto frontier. "
               f"Stars: the paper on HDTF ({paper}); dotted: its ground-truth Sync-C {PAPER_GROUND_TRUTH_SYNC_C}. "
               "HDTF is not our held-out set: a reference, not a like-for-like comparison.")  # fmt: skip
    if any(p.tiny for p in points):
        caption += f" Hollow points: {TINY_LABEL}."
    left_out = len(measured) - len(plotted)
    rows = [[run.info.run_name, run.info.run_id, number(p.sync_c), number(p.x),
             f"{run.data.params.get('profile', '-')}{' (' + TINY_LABEL + ')' if p.tiny else ''}", "yes" if best else "no"]
            for run, p, best in zip(plotted, points, optimal)]  # fmt: skip
    blocks: list[Block] = [Image(f"frontier-{axis}.png", frontier_figure(points, optimal, axis), caption)]
    blocks.append(Table(["run", "id", "Sync-C", axis.upper(), "profile", "Pareto-optimal"], rows))
    if left_out:
        blocks.append(f"{left_out} runs with Sync-C but no {axis.upper()} are not plotted.")
    return blocks


def config_diffs(runs: list[Run]) -> list[Block]:
    """Per job, the params whose values differ between its runs (a missing param counts as a value)."""
    blocks: list[Block] = []
    for job, group in itertools.groupby(sorted(runs, key=job_of), key=job_of):
        group = list(group)
        if len(group) < 2:
            blocks.append(f"{job}: one run, nothing to compare.")
            continue
        keys = sorted({key for run in group for key in run.data.params})
        differing = [key for key in keys if len({run.data.params.get(key) for run in group}) > 1]
        rows = [[key, *(run.data.params.get(key, "-") for run in group)] for key in differing]
        blocks += [f"{job} runs: {len(differing)} of {len(keys)} params differ.", Table(["param", *map(label, group)], rows)]
    return blocks


def student_uris(runs: list[Run]) -> list[str]:
    """The registered student versions the eval runs scored, pinned to the version they recorded."""
    uris = []
    for run in runs:
        student = run.data.tags.get("student") or run.data.params.get("student_weights", "")
        version = run.data.tags.get("student_version", "")
        if student.startswith("models:/") and version.isdigit():
            uris.append(f"models:/{student.removeprefix('models:/').split('@')[0].split('/')[0]}/{version}")
        elif student.startswith("models:/"):
            uris.append(student)
    return uris


def lineage_tables(runs: list[Run], champion: str) -> list[Block]:
    """The lineage chain of each student version the runs evaluated, then of the champion (if any),
    each version once."""
    blocks: list[Block] = []
    shown: dict[tuple[str, str], str] = {}  # (model, version) -> the URI it was traced as
    for uri in dict.fromkeys([*student_uris(runs), champion]):
        try:
            links = lineage.chain(uri)
        except mlflow.exceptions.MlflowException as err:
            if uri != champion:
                blocks.append(f"{uri}: not found in the registry ({err.message}).")
            continue
        version = (links[0]["name"], str(links[0]["version"]))
        if version in shown:
            blocks.append(f"{uri} is {shown[version]}, traced above.")
            continue
        shown[version] = uri
        rows = [[link["link"], "; ".join(f"{k}={v}" for k, v in flatten(link).items() if k != "link" and v != "")]
                for link in links]  # fmt: skip
        blocks += [f"{uri}: {len(links)} links, newest first (the chain ends where a link is missing).", Table(["link", "details"], rows)]
    return blocks


def retrain_decisions(client: MlflowClient, config: CompareConfig, ids: list[str]) -> list[Block]:
    """The retrain runs of the experiments (same dates): each decision, why, and the key metrics of both sides."""
    where = " and ".join(["tags.job = 'retrain'", *time_clauses(config)])
    runs = client.search_runs(ids, where, order_by=["attributes.start_time DESC"], max_results=config.max_runs)
    compared = [m for m in KEY_METRICS if any(f"challenger.{m}" in run.data.metrics for run in runs)]
    rows = [[started(run), run.info.run_id, run.data.tags.get("retrain.run", "-"), run.data.tags.get("retrain.decision", "-"),
             run.data.tags.get("retrain.reason", "-"), run.data.params.get("challenger", "-"), run.data.params.get("champion", "-"),
             *(f"{number(run.data.metrics.get('challenger.' + m))} vs {number(run.data.metrics.get('champion.' + m))}" for m in compared)]
            for run in runs]  # fmt: skip
    headers = ["started", "run id", "cycle", "decision", "reason", "challenger", "champion", *(f"{m} (challenger vs champion)" for m in compared)]
    return [Table(headers, rows)] if runs else []


def build_report(config: CompareConfig, client: MlflowClient, runs: list[Run]) -> list[Section]:
    experiments = {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ALL)}
    children = {run.info.run_id: stage_runs(client, run) for run in runs}
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections: list[Section] = [
        ("Selection", [f"Runs compared: {len(runs)} ({describe(config)}; newest first, at most {config.max_runs}). Generated {now}."]),
        ("Metrics", metrics_tables(runs, children, experiments)),
        ("Loss curves", curve_figures(client, runs, children) or ["No selected run logged a loss."]),
    ]
    if any("sync_c" in run.data.metrics for run in runs):
        sections.append(("Sync-C frontier", frontier(runs)))
    sections.append(("Config differences", config_diffs(runs)))
    sections.append(("Lineage", lineage_tables(runs, config.champion) or ["No registered student to trace."]))
    decisions = retrain_decisions(client, config, experiment_ids(config, client))
    if decisions:
        sections.append(("Retrain decisions", decisions))
    return sections


def compare(config: CompareConfig) -> int:
    tracking.setup_tracking()
    client = MlflowClient()
    runs = select_runs(config, client)
    if not runs:
        print(f"no runs match ({describe(config)}): nothing to compare", file=sys.stderr)
        return 1
    sections = build_report(config, client, runs)
    with tempfile.TemporaryDirectory(prefix="lipforcing-compare-") as folder:
        write_report(folder, TITLE, sections)
        with tracking.start_run("compare", config=config, tags={"job": "compare"}) as run:
            mlflow.log_artifacts(folder)
        if storage.exists(storage.join(config.output, "images")):  # no figure left from an earlier report
            storage.remove(storage.join(config.output, "images"), recursive=True)
        storage.upload_folder(folder, config.output)
    print(f"compared {len(runs)} runs: {storage.join(config.output, 'report.html')} (and report.md); "
          f"in MLflow: run {run.info.run_id} ('compare', experiment {tracking.EXPERIMENT}), artifact report.html")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(CompareConfig, overrides=list(sys.argv[1:] if argv is None else argv))
        validate(config)
        return compare(config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
