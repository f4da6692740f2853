"""`make data` as users run it (ingest, then the SyncNet score pass) and the job's bookkeeping:
task identity, incremental reruns, failures that must not sink the job, a kill mid-score-pass.

The bookkeeping tests need no Ray; the end-to-end tests run the real job on the session's local
Ray with input and output on the local S3 server.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from data_jobs.config import DataJobConfig
from data_jobs.inputs import InputItem
from data_jobs.job import (
    JobSummary,
    failure_check,
    kept_markers,
    plan_tasks,
    read_markers,
    run_data_job,
    task_name,
)
from data_jobs.manifest import read_table
from lipforcing import storage
from lipforcing.config import ConfigError
from pipelines.jobs import resolve_config
from tests.conftest import kill_data_job_once

GOOD = ["hdtf_astronaut_25fps.mp4", "vox_offset_0p4s.mp4", "hallo3_t1b_2997fps.mp4"]
ADDED = ["vox_hard_cut.mp4"]


def job_config(*overrides: str) -> DataJobConfig:
    return resolve_config(DataJobConfig, ["profile=tiny", "execution.progress=false", *overrides])


def items(*names: str) -> list[InputItem]:
    return [InputItem(f"s3://raw/{name}", "d", key_stem=name) for name in sorted(names)]


def test_adding_inputs_never_moves_a_finished_task():
    """Tasks are named by their inputs; new files form new tasks and leave committed ones alone."""
    config = job_config("write.inputs_per_task=2")
    first = plan_tasks(config, items("a", "c", "e", "g"), covered=set())
    assert [[i.video for i in t.items] for t in first] == [["s3://raw/a", "s3://raw/c"], ["s3://raw/e", "s3://raw/g"]]
    assert first[0].name == task_name(config, ["s3://raw/a", "s3://raw/c"]) != first[1].name
    covered = {i.video for t in first for i in t.items}
    later = plan_tasks(config, items("a", "b", "c", "e", "f", "g"), covered)
    assert [[i.video for i in t.items] for t in later] == [["s3://raw/b", "s3://raw/f"]]
    # A killed run resumes with the same tasks: the committed one leaves a whole chunk out.
    resumed = plan_tasks(config, items("a", "c", "e", "g"), covered={"s3://raw/a", "s3://raw/c"})
    assert [t.name for t in resumed] == [first[1].name]


def test_refused_listings_are_never_planned():
    config = job_config("write.inputs_per_task=4")
    listed = [*items("a"), InputItem("s3://raw/a", "d", problem="duplicate: listed 2 times")]
    assert [[i.video for i in t.items] for t in plan_tasks(config, listed, set())] == [["s3://raw/a"]]


def test_kept_markers_drop_failed_superseded_and_orphaned_tasks():
    digest = "h1"
    markers = {
        "t-done": {"config_hash": digest, "inputs": ["s3://raw/a"]},
        "t-failed": {"config_hash": digest, "inputs": ["s3://raw/b"], "failed": True},
        "t-gone": {"config_hash": digest, "inputs": ["s3://raw/c", "s3://raw/x"]},  # x was deleted
        "t-twice": {"config_hash": digest, "inputs": ["s3://raw/a"]},  # claims a's input again
    }
    kept = kept_markers(markers, items("a", "b", "c"), digest, "out")
    assert list(kept) == ["t-done"]
    with pytest.raises(ConfigError, match="config hash"):
        kept_markers({"t": {"config_hash": "other", "inputs": []}}, [], digest, "out")


def test_markers_are_read_with_one_listing(tmp_path):
    stats = tmp_path / "stats"
    stats.mkdir()
    for index in range(30):
        (stats / f"t-{index:03d}.json").write_text(json.dumps({"task": f"t-{index:03d}", "n": index}))
    found = read_markers(str(stats))
    assert sorted(found) == [f"t-{i:03d}" for i in range(30)] and found["t-007"]["n"] == 7
    assert list(read_markers(str(stats), {"t-003", "t-999"})) == ["t-003"]


def test_retry_repeats_transient_errors_only():
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return "ok"

    assert storage.retry(flaky, backoff_s=0.0) == "ok" and len(calls) == 3
    calls.clear()

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("no such object")

    with pytest.raises(FileNotFoundError):
        storage.retry(missing, backoff_s=0.0)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("reasons", "inputs", "failed"),
    [
        ({"faces/error": 2, "faces/no_face": 50}, 100, False),  # 2% errors; unfit inputs are outcomes
        ({"task/failed": 11}, 100, True),  # 11% > 10%
        ({"faces/error": 6, "probe/error": 6}, 100, False),  # each reason alone is under the share
        ({"score/worker_died": 1}, 1, True),
    ],
)
def test_failure_check_counts_machinery_failures_per_reason(reasons, inputs, failed):
    message = failure_check(JobSummary(inputs=inputs, reasons=reasons), max_share=0.1)
    assert bool(message) == failed
    if failed:
        assert max(reasons, key=reasons.get) in message and "execution.max_failure_share" in message


# --- the job on Ray and S3 --------------------------------------------------------------------


def upload(sample_list: str, bucket_prefix: str, names: list[str]) -> None:
    root = sample_list.rsplit("/", 1)[0]
    for name in names:
        storage.upload_file(f"{root}/videos/{name}", f"{bucket_prefix}/{name}")


def tar_keys(output: str) -> list[str]:
    keys = []
    for url in storage.glob(storage.join(output, "shards", "*.tar")) + storage.glob(storage.join(output, "heldout", "shards", "*.tar")):
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url))) as tar:
            keys += [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".mp4")]
    return sorted(keys)


def manifests(output: str) -> pd.DataFrame:
    """The training and (when any identity is held out) the held-out manifest together."""
    heldout = f"{output}/heldout/manifest.parquet"
    parts = [read_table(f"{output}/manifest.parquet")] + ([read_table(heldout)] if storage.exists(heldout) else [])
    return pd.concat(parts, ignore_index=True)


def assert_every_aligned_sample_accounted(output: str) -> pd.DataFrame:
    """No gaps, no duplicates: each aligned sample is in a final manifest (once, in one shard) or
    a score reject; each final sample carries its SyncNet verdict."""
    aligned, final = manifests(f"{output}/aligned"), manifests(output)
    rejects = read_table(f"{output}/rejects.parquet")
    scored_out = rejects[rejects["stage"] == "score"]
    assert tar_keys(output) == sorted(final["key"])
    assert len(final) + len(scored_out) == len(aligned)
    assert set(final["key"]) <= set(aligned["key"])
    assert final["sync_conf"].notna().all() and final["av_offset"].notna().all()
    return final


@pytest.mark.integration
def test_make_data_with_scoring_on_s3_then_an_incremental_rerun(local_ray, s3_bucket, sample_list, trained_syncnet, monkeypatch, tmp_path):
    """`make data` (ingest + score) on S3; then files are added to the input prefix and the rerun
    processes only them: finished tasks keep their markers byte for byte."""
    from pipelines.data import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    raw, output = f"{s3_bucket}/raw/clips", f"{s3_bucket}/data"
    upload(sample_list, raw, GOOD)
    argv = [f"input={raw}", f"output={output}", f"score.syncnet={trained_syncnet}", "write.inputs_per_task=1"]
    assert main(job_config(*argv)) == 0
    first = assert_every_aligned_sample_accounted(output)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("lipforcing").experiment_id], "tags.job = 'data'")
    [written] = [i.dataset for i in run.inputs.dataset_inputs if {t.key: t.value for t in i.tags}["mlflow.data.context"] == "output"]
    assert json.loads(written.source)["uri"] == output  # the data run names the shards where they lie
    assert written.digest == hashlib.sha256(storage.read_bytes(f"{output}/manifest.parquet")).hexdigest()[:32]
    marker_urls = storage.glob(f"{output}/aligned/stats/*.json") + storage.glob(f"{output}/stats/*.json")
    markers = {url: storage.read_bytes(url) for url in marker_urls}
    assert len(storage.glob(f"{output}/aligned/stats/*.json")) == len(GOOD)

    upload(sample_list, raw, ADDED)
    assert main(job_config(*argv)) == 0
    summary = json.loads(storage.read_text(f"{output}/summary.json"))
    assert summary["tasks_run"] == len(ADDED) and summary["tasks_skipped"] == len(GOOD)
    aligned = read_markers(f"{output}/aligned/stats")
    new = [m for m in aligned.values() if f"{raw}/{ADDED[0]}" in m["inputs"]]
    assert len(new) == 1 and new[0]["inputs"] == [f"{raw}/{ADDED[0]}"]  # only the new file ran
    for url, data in markers.items():
        assert storage.read_bytes(url) == data, f"{url} was rewritten"
    second = assert_every_aligned_sample_accounted(output)
    assert set(first["key"]) < set(second["key"])
    assert set(second[~second["key"].isin(first["key"])]["source"]) == {f"{raw}/{ADDED[0]}"}


@pytest.mark.integration
def test_a_kill_mid_score_pass_resumes_without_duplicates_or_gaps(local_ray, s3_server, s3_bucket, sample_list, trained_syncnet, tmp_path, monkeypatch):
    raw, output = f"{s3_bucket}/raw/kill", f"{s3_bucket}/kill"
    upload(sample_list, raw, GOOD)
    argv = [f"input={raw}", f"output={output}", f"score.syncnet={trained_syncnet}", "write.inputs_per_task=1",
            "execution.concurrency=1"]  # fmt: skip
    scored_at_kill = kill_data_job_once(argv, f"{output}/stats/*.json", f"{tmp_path}/killed.db", timeout=600)  # the first scored task
    assert scored_at_kill < len(GOOD)

    from pipelines.data import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/resumed.db")
    assert main(job_config(*argv)) == 0
    summary = json.loads(storage.read_text(f"{output}/summary.json"))
    assert summary["tasks_run"] == len(GOOD) - scored_at_kill
    assert_every_aligned_sample_accounted(output)


@pytest.mark.integration
def test_a_task_that_keeps_failing_becomes_task_rejects_and_the_job_finishes(local_ray, sample_list, tmp_path):
    """A permanent write error (a folder where the task's shard must go) fails that task only: its
    input is a `task` reject, the other task commits, and the failure share decides the exit."""
    root = sample_list.rsplit("/", 1)[0]
    videos = [f"{root}/videos/{name}" for name in GOOD[:2]]
    pd.DataFrame({"video": videos, "dataset": "d"}).to_csv(tmp_path / "two.csv", index=False)
    output = str(tmp_path / "data")
    config = job_config(f"input={tmp_path}/two.csv", f"output={output}", "write.inputs_per_task=1", "execution.task_attempts=2")
    blocked = task_name(config, [sorted(videos)[0]])
    os.makedirs(f"{output}/shards/{blocked}-00.tar")
    summary = run_data_job(config)
    rejects = read_table(f"{output}/rejects.parquet")
    task_rows = rejects[rejects["stage"] == "task"]
    assert task_rows["source"].tolist() == [sorted(videos)[0]] and task_rows["reason"].tolist() == ["failed"]
    assert "attempt 2/2" in task_rows["detail"].iloc[0]
    assert summary.tasks_failed == 1 and summary.written >= 1
    assert "task/failed" in summary.failure  # 1 of 2 inputs > 10%
    assert json.loads(storage.read_text(f"{output}/stats/{blocked}.json"))["failed"]

    os.rmdir(f"{output}/shards/{blocked}-00.tar")  # the cause is fixed: the next run retries that task only
    again = run_data_job(config)
    assert again.tasks_run == 1 and again.tasks_failed == 0 and not again.failure
    assert (read_table(f"{output}/rejects.parquet")["stage"] != "task").all()


def test_a_broken_model_pack_stops_the_job_before_any_work(sample_list, tmp_path):
    weights = tmp_path / "koniq_pretrained.pkl"
    weights.write_bytes(b"not a checkpoint")
    output = tmp_path / "data"
    config = job_config(f"input={sample_list}", f"output={output}", "iqa.backend=hyperiqa", f"iqa.weights={weights}")
    with pytest.raises(ConfigError, match="iqa.weights"):
        run_data_job(config)
    assert not storage.glob(f"{output}/stats/*.json")
