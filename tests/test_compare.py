"""`make compare` on a real SQLite MLflow store holding planted runs: distill jobs with stage runs and
loss curves, eval runs, a data run, a retrain decision, a registered student, a second experiment.
Expected values are derived from what is planted; the HTML report is opened in headless Chromium."""

from __future__ import annotations

import datetime
import html
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from lipforcing.config import load_config
from pipelines import tracking
from pipelines.compare import CompareConfig, main, number, select_runs
from pipelines.compare_plots import TINY_LABEL, pareto_optimal

OTHER = "sweeps"  # the second experiment
STEPS = 6
LOSSES = {"teacher": ("teacher_loss",), "student": ("loss",), "dmd": ("dmd_loss", "fake_score_loss")}
DISTILL_PARAMS = {
    "a": {"run_name": "a", "profile": "tiny", "seed": "0", "dmd.train.lr": "2e-06", "output": "outputs/a"},
    "b": {"run_name": "b", "profile": "tiny", "seed": "0", "dmd.train.lr": "1e-06", "output": "outputs/b", "dmd.ema": "true"},
    "c": {"run_name": "c", "profile": "tiny", "seed": "1", "dmd.train.lr": "2e-06", "output": "outputs/c"},
}
SCALES = {"a": 1.0, "b": 2.0, "c": 3.0}
# name -> (profile, registered version or "", metrics); frontier on (Sync-C, FVD): e1 and e2 are optimal
EVALS = {
    "e1": ("1.3b", "1", {"sync_c": 6.0, "fvd": 120.0, "ssim": 0.90, "psnr": 30.5}),
    "e2": ("1.3b", "1", {"sync_c": 7.0, "fvd": 160.0, "ssim": 0.93, "psnr": 31.25}),
    "e3": ("1.3b", "7", {"sync_c": 5.0, "fvd": 170.0, "ssim": 0.95, "psnr": 29.0}),  # version 7 is not registered
    "e4": ("tiny", "", {"sync_c": 2.0, "ssim": 0.5, "psnr": 12.0}),  # no FVD
    "e5": ("1.3b", "", {"sync_c": 6.2, "ssim": 0.92, "psnr": 30.0}),  # no FVD
}
OLD_EVAL = ("1.3b", "", {"sync_c": 6.5, "fvd": 300.0, "ssim": 0.80, "psnr": 25.0})  # started 2024-03-10 12:00 UTC
OLD_START = datetime.datetime(2024, 3, 10, 12, 0, tzinfo=datetime.UTC)
REASON = "sync_c 5.1 vs 6 | worse by 0.9 <b>tolerance 0.1</b>"


def loss_at(scale: float, index: int, step: int) -> float:
    return scale * (index + 1) / step


def eval_params(name: str, profile: str, version: str) -> dict[str, str]:
    """An eval's params: a registered student is read through an alias, an unregistered one from a file."""
    student = f"models:/lipforcing-student@{name}" if version else f"/weights/{name}.safetensors"
    return {"profile": profile, "student_weights": student, "clips": "8", "decoder": "tae"}


@dataclass
class Planted:
    ids: dict[str, str]  # planted name -> run id
    stages: dict[str, dict[str, str]]  # distill name -> stage -> run id
    uri: str


def plant_distill(name: str, experiment: str) -> tuple[str, dict[str, str]]:
    stages = {}
    with tracking.start_run("distill", tags={"job": "distill"}, experiment=experiment) as parent:
        mlflow.log_params(DISTILL_PARAMS[name])
        for stage, keys in LOSSES.items():
            with tracking.start_run(stage, parent_run_id=parent.info.run_id, tags={"stage": stage}, experiment=experiment) as run:
                for step in range(1, STEPS + 1):
                    mlflow.log_metrics({key: loss_at(SCALES[name], i, step) for i, key in enumerate(keys)}, step=step)
                stages[stage] = run.info.run_id
    return parent.info.run_id, stages


def plant_eval(name: str, profile: str, version: str, metrics: dict[str, float]) -> str:
    params = eval_params(name, profile, version)
    tags = {"job": "eval", "student": params["student_weights"], "student_version": version or "unregistered"}
    with tracking.start_run("eval", tags=tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        for clip in range(2):
            mlflow.log_metric("clip/ssim", metrics["ssim"], step=clip)
    return run.info.run_id


def plant_old_eval() -> str:
    """An eval run started on a known day (MLflow's client takes a start time; `start_run` does not)."""
    client = MlflowClient()
    profile, version, metrics = OLD_EVAL
    params = eval_params("old", profile, version)
    run = client.create_run(tracking.setup_tracking(), start_time=int(OLD_START.timestamp() * 1000), run_name="eval",
                            tags={"job": "eval", "student": params["student_weights"]})  # fmt: skip
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Planted:
    """One store for the module (planting is the slow part); no test adds a run the others select."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('compare-store')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        tracking.setup_tracking()
        ids, stages = {}, {}
        for name in ("a", "b"):
            ids[name], stages[name] = plant_distill(name, tracking.EXPERIMENT)
        ids["c"], stages["c"] = plant_distill("c", OTHER)
        ids["old"] = plant_old_eval()
        for name, (profile, version, metrics) in EVALS.items():
            ids[name] = plant_eval(name, profile, version, metrics)
        with tracking.start_run("data", tags={"job": "data"}) as run:
            mlflow.log_metric("wall_s", 12.0)
            ids["data"] = run.info.run_id
        tags = {"job": "retrain", "retrain.run": "20260101-0", "retrain.decision": "refused", "retrain.reason": REASON}
        with tracking.start_run("retrain", tags=tags) as run:
            mlflow.log_params({"challenger": "models:/lipforcing-student/2", "champion": "models:/lipforcing-student/1"})
            mlflow.log_metrics({"challenger.sync_c": 5.1, "champion.sync_c": 6.0, "challenger.chunks": 3.0, "champion.chunks": 3.0})
            ids["retrain"] = run.info.run_id
        client = MlflowClient()
        client.create_registered_model("lipforcing-student")
        dmd = client.get_run(stages["a"]["dmd"])
        version = client.create_model_version("lipforcing-student", f"{dmd.info.artifact_uri}/model", run_id=dmd.info.run_id)
        client.set_registered_model_alias("lipforcing-student", "champion", version.version)
        yield Planted(ids, stages, uri)  # conftest points MLflow back at the environment after each test


def selected(planted: Planted, *overrides: str) -> list[str]:
    """The planted names of the runs `select_runs` picks, in its order."""
    names = {run_id: name for name, run_id in planted.ids.items()}
    names.update({run_id: f"{name}.{stage}" for name, stages in planted.stages.items() for stage, run_id in stages.items()})
    config = load_config(CompareConfig, overrides=overrides)
    return [names.get(run.info.run_id, run.info.run_id) for run in select_runs(config, MlflowClient(planted.uri))]


def md_tables(markdown: str) -> list[list[dict[str, str]]]:
    """Every Markdown table of the report as rows of {header: cell}."""
    found, block = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            block.append([html.unescape(cell.strip().replace("\\|", "|")) for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif block:
            found.append([dict(zip(block[0], row)) for row in block[2:]])
            block = []
    return found


def table_with(markdown: str, header: str) -> list[dict[str, str]]:
    """The one table of the report that has this column."""
    tables = [t for t in md_tables(markdown) if t and header in t[0]]
    assert len(tables) == 1, f"{len(tables)} tables with {header!r}"
    return tables[0]


@pytest.fixture(scope="module")
def report(planted, tmp_path_factory) -> Path:
    """The report over both experiments (default tags: distill and eval), written once."""
    output = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", planted.uri)
        assert main([f"output={output}", f"experiments=[{tracking.EXPERIMENT},{OTHER}]"]) == 0
    return output


def test_pareto_optimal_on_a_known_answer():
    points = [(6.0, 120.0), (7.0, 160.0), (5.0, 170.0), (6.0, 120.0), (7.0, 200.0), (8.0, 400.0), (4.0, 100.0)]
    # lower x (FVD) better: (5, 170) is beaten by (6, 120); (7, 200) by (7, 160); equal points both stay
    assert pareto_optimal(points, lower_x_is_better=True) == [True, True, False, True, False, True, True]
    # higher x (SSIM) better: only the points no one beats on both Sync-C and x stay
    ssim = [(6.0, 0.90), (7.0, 0.93), (5.0, 0.95), (6.5, 0.93), (2.0, 0.5)]
    assert pareto_optimal(ssim, lower_x_is_better=False) == [False, True, True, False, False]
    assert pareto_optimal([], lower_x_is_better=True) == []


def test_a_single_value_of_a_list_key_is_a_list_of_one():
    config = load_config(CompareConfig, overrides=["tag=job=distill", "runs=abc", "experiments=[x,y]"])
    assert (config.tag, config.runs, config.experiments) == (["job=distill"], ["abc"], ["x", "y"])


@pytest.mark.parametrize(
    "argv", [["max_runs=0"], ["since=2024-13-01"], ["tag=nokeyvalue"], ["tag=job='x'"], ["experiments=[]"], ["colour=red"]]
)
def test_bad_config_exits_2(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("config error:")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), ["e5", "e4", "e3", "e2", "e1", "b", "a", "old"]),  # top-level distill + eval runs, newest first
        (("tag=job=distill",), ["b", "a"]),
        ((f"experiments=[{tracking.EXPERIMENT},{OTHER}]", "tag=job=distill"), ["c", "b", "a"]),
        ((f"experiments={OTHER}",), ["c"]),
        (("tag=[job=eval,student_version=1]",), ["e2", "e1"]),  # different keys: both must hold
        (("tag=[job=data,job=retrain]",), ["retrain", "data"]),  # one key: either value
        (("nested=true", "tag=stage=dmd"), ["b.dmd", "a.dmd"]),
        (("since=2024-03-10", "until=2024-03-10"), ["old"]),  # one whole day
        (("until=2024-03-09",), []),
        (("max_runs=2",), ["e5", "e4"]),
    ],
)
def test_filters_select_the_right_runs(planted, overrides, expected):
    assert selected(planted, *overrides) == expected


@pytest.mark.integration
def test_since_today_leaves_out_older_runs_and_runs_picks_by_id(planted):
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    assert "old" not in selected(planted, f"since={today}") and "e1" in selected(planted, f"since={today}")
    assert selected(planted, f"runs=[{planted.ids['e1']},{planted.ids['c']}]", "tag=job=nothing") == ["e1", "c"]


@pytest.mark.integration
def test_an_empty_selection_exits_1_without_a_report(planted, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", planted.uri)
    client = MlflowClient(planted.uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    before = len(client.search_runs([experiment], "tags.job = 'compare'"))
    assert main(["tag=job=nothing", f"output={tmp_path}/out"]) == 1
    assert "no runs match" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert len(client.search_runs([experiment], "tags.job = 'compare'")) == before


@pytest.mark.integration
def test_an_unknown_run_id_or_experiment_is_a_config_error(planted, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", planted.uri)
    assert main(["runs=0123456789abcdef0123456789abcdef"]) == 2
    assert main(["experiments=nowhere"]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.integration
def test_the_metrics_tables_hold_the_planted_values(planted, report):
    markdown = (report / "report.md").read_text()
    evals = table_with(markdown, "sync_c")
    rows = {row["id"]: row for row in evals}
    for name, (profile, _, metrics) in [*EVALS.items(), ("old", OLD_EVAL)]:
        row = rows[planted.ids[name]]
        assert row["profile"] == profile and row["experiment"] == tracking.EXPERIMENT
        assert {key: row[key] for key in ("sync_c", "fvd", "ssim", "psnr")} == {
            key: number(metrics.get(key)) for key in ("sync_c", "fvd", "ssim", "psnr")
        }
    assert rows[planted.ids["old"]]["started"] == "2024-03-10 12:00"
    distill = {row["id"]: row for row in table_with(markdown, "dmd.dmd_loss")}
    assert set(distill) == {planted.ids[name] for name in "abc"}
    for name in "abc":
        row = distill[planted.ids[name]]
        assert row["experiment"] == (OTHER if name == "c" else tracking.EXPERIMENT)
        for stage, keys in LOSSES.items():
            for index, key in enumerate(keys):
                assert row[f"{stage}.{key}"] == number(loss_at(SCALES[name], index, STEPS))  # the last logged value
    assert f"Runs of profile tiny: {TINY_LABEL}." in markdown


@pytest.mark.integration
def test_the_diff_tables_list_exactly_the_differing_params(planted, report):
    markdown = (report / "report.md").read_text()
    for group in (["a", "b", "c"], ["old", *EVALS]):
        params = [DISTILL_PARAMS[n] if n in DISTILL_PARAMS else eval_params(n, *(EVALS.get(n) or OLD_EVAL)[:2]) for n in group]
        keys = {key for p in params for key in p}
        differing = sorted(key for key in keys if len({p.get(key) for p in params}) > 1)
        runs = {planted.ids[name][:8] for name in group}
        [table] = [t for t in md_tables(markdown) if t and "param" in t[0] and {h[-8:] for h in t[0] if h != "param"} == runs]
        assert [row["param"] for row in table] == differing


@pytest.mark.integration
def test_the_frontier_marks_the_pareto_optimal_runs(planted, report):
    markdown = (report / "report.md").read_text()
    rows = {row["id"]: row for row in table_with(markdown, "Pareto-optimal")}
    with_fvd = {name: spec[2] for name, spec in [*EVALS.items(), ("old", OLD_EVAL)] if "fvd" in spec[2]}
    assert set(rows) == {planted.ids[name] for name in with_fvd}  # the runs without FVD are left out
    optimal = {name for name in with_fvd if rows[planted.ids[name]]["Pareto-optimal"] == "yes"}
    assert optimal == {"e1", "e2"}
    assert "against FVD (lower is better)" in markdown and "2 runs with Sync-C but no FVD are not plotted" in markdown
    assert (report / "images" / "frontier-fvd.png").stat().st_size > 10_000


@pytest.mark.integration
def test_without_fvd_the_frontier_falls_back_to_ssim(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", planted.uri)
    assert main([f"runs=[{planted.ids['e4']},{planted.ids['e5']}]", f"output={tmp_path}"]) == 0
    markdown = (tmp_path / "report.md").read_text()
    rows = {row["id"]: row for row in table_with(markdown, "Pareto-optimal")}
    assert rows[planted.ids["e5"]]["Pareto-optimal"] == "yes" and rows[planted.ids["e4"]]["Pareto-optimal"] == "no"
    assert "SSIM" in rows[planted.ids["e4"]] and TINY_LABEL in rows[planted.ids["e4"]]["profile"]
    assert "no selected eval run has FVD" in markdown and (tmp_path / "images" / "frontier-ssim.png").exists()


@pytest.mark.integration
def test_curves_lineage_retrain_and_the_mlflow_artifact(planted, report):
    markdown = (report / "report.md").read_text()
    for stage in LOSSES:
        assert f"![loss-{stage}.png](images/loss-{stage}.png)" in markdown
        assert (report / "images" / f"loss-{stage}.png").stat().st_size > 10_000
    lineage = [t for t in md_tables(markdown) if t and "link" in t[0]]
    assert len(lineage) == 1  # version 1 (evaluated by e1, e2; also the champion) traced once
    assert [row["link"] for row in lineage[0]] == ["model version", "training run"]
    assert f"run_id={planted.ids['a']}" in lineage[0][1]["details"]
    assert "models:/lipforcing-student/7: not found in the registry" in markdown
    assert "models:/lipforcing-student@champion is models:/lipforcing-student/1, traced above." in markdown
    [decision] = table_with(markdown, "decision")
    assert (decision["run id"], decision["decision"], decision["reason"]) == (planted.ids["retrain"], "refused", REASON)
    assert decision["sync_c (challenger vs champion)"] == "5.1 vs 6" and decision["cycle"] == "20260101-0"
    assert "chunks (challenger vs champion)" not in decision  # key metrics only
    page = (report / "report.html").read_text()
    assert "<b>tolerance" not in page and "&lt;b&gt;tolerance 0.1&lt;/b&gt;" in page  # MLflow strings are escaped
    client = MlflowClient(tracking_uri=planted.uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    [run] = client.search_runs([experiment], f"tags.job = 'compare' and params.output = '{report}'")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.html", "report.md", "images"}
    assert run.info.run_name == "compare"


@pytest.mark.integration
def test_a_report_without_retrain_runs_or_eval_runs(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", planted.uri)
    assert main([f"experiments={OTHER}", f"output={tmp_path}"]) == 0
    markdown = (tmp_path / "report.md").read_text()
    assert "## Retrain decisions" not in markdown and "## Sync-C frontier" not in markdown
    assert "distill: one run, nothing to compare." in markdown
    assert {p.name for p in (tmp_path / "images").iterdir()} == {f"loss-{stage}.png" for stage in LOSSES}


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.integration
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_the_html_report_renders_in_chromium(report, tmp_path):
    flags = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"]
    url = (report / "report.html").as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "<table>" in dom and "<th>sync_c</th>" in dom
    assert re.search(r"<img src=\"data:image/png;base64,[A-Za-z0-9+/=]{1000,}\"", dom)
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1000, 1400) and pixels.std() > 10  # text, tables and a figure: not a blank page
