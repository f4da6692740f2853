"""The cluster path for real: `make data`, `make distill` and `make eval` submitted to a multi-node
cluster in a box (a head with no CPUs, two worker nodes in private mount namespaces, S3 and an
MLflow server shared by nothing but the network), exactly as the README's cluster section tells a
user; then a worker node dies (SIGKILL to its raylet and workers) in the middle of each job.

The worker nodes cannot see the head's /tmp or the checkout's outputs/, so any path a driver hands
to a worker that exists only where the driver runs fails the job here: the property is checked by
construction, and a canary proves the isolation holds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import mlflow
import pytest
import s3fs

from lipforcing import storage
from pipelines.cluster_box import BoxConfig, down, up
from tests.conftest import REPO_ROOT

pytestmark = [
    pytest.mark.integration,
    # the module's pipeline fixture runs data -> distill -> eval on the box: ~7 min alone, over 15 on a
    # loaded 2-core machine, more than the suite's per-test limit
    pytest.mark.timeout(2400),
    pytest.mark.skipif(os.geteuid() != 0, reason="worker nodes need their own mount namespaces (unshare -m, as root)"),
]
CLIPS = ("hdtf_astronaut_25fps.mp4", "hallo3_t1b_2997fps.mp4", "vox_t1a_30fps.mp4", "bad_text_named_mp4.mp4")
# Short stages: the point is where things run and what survives, not how well they train.
STEPS = " ".join(
    f"{section}.steps=2 {section}.checkpoint_every=2" for section in ("teacher.base", "teacher.train", "student.train", "dmd.train")
)


@pytest.fixture(scope="module")
def box(tmp_path_factory, sample_list):
    running = up(BoxConfig(root=str(tmp_path_factory.mktemp("box")), workers=2))
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in running.env().items():
                patch.setenv(key, value)  # this process reads S3 and MLflow as the user's shell does
            s3fs.S3FileSystem.clear_instance_cache()  # fsspec would reuse a client of the session's S3 server
            sample = sample_list.rsplit("/", 1)[0]
            for name in CLIPS:
                storage.upload_file(f"{sample}/videos/{name}", f"s3://{running.bucket}/raw/videos/{name}")
            yield running
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # and later tests must not reuse one of the box's
        down(running.root)


@pytest.fixture(autouse=True)
def query_the_box_tracking_server(box):
    """Read runs from the box's server (another module may have pointed MLflow elsewhere; conftest
    points it back after the test)."""
    mlflow.set_tracking_uri(box.env()["MLFLOW_TRACKING_URI"])


def user_env(box) -> dict[str, str]:
    """The environment of a user's shell after `source outputs/box/env.sh`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}, **box.env()}


def make(box, target: str, args: str = "", wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """`make <target> ARGS="..."` from a shell that sourced the box's env.sh, as the README says."""
    env = user_env(box)
    command = ["make", "-s", target, f"ARGS={args}"]
    if not wait:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done


@pytest.fixture(scope="module")
def pipeline(box):
    """data -> distill -> eval, each submitted to the box, everything on s3:// and the tracking server."""
    bucket = f"s3://{box.bucket}"
    logs = {"data": make(box, "data", f"input={bucket}/raw output={bucket}/data execution.progress=false").stdout}
    logs["distill"] = make(box, "distill", f"data={bucket}/data output={bucket}/distill {STEPS}").stdout
    logs["eval"] = make(box, "eval", f"data={bucket}/data output={bucket}/eval").stdout
    return logs


def test_worker_nodes_see_nothing_of_the_head(box, tmp_path):
    """The canary: a file on the head's disk (here, this test's tmp_path) and the checkout's outputs/
    are absent on every worker node, present on the head."""
    canaries = [tmp_path / "only-on-the-head", REPO_ROOT / "outputs" / "box-canary"]
    for canary in canaries:
        canary.parent.mkdir(exist_ok=True)
        canary.write_text("x")
    check = subprocess.run(
        [sys.executable, "-m", "pipelines.cluster_check", "expect_nodes=3", f"paths=[{canaries[0]},{canaries[1]}]"],
        cwd=REPO_ROOT, env=user_env(box), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    nodes = [line for line in check.stdout.splitlines() if "imports ok" in line]
    assert len(nodes) == 3
    head = next(n["node_id"] for n in box.nodes() if n["is_head_node"])
    for line in nodes:
        on_head = line.split()[1] == head[:12]
        assert ("present: none" in line) != on_head, line  # the head sees its own files, workers never
    canaries[1].unlink()


def test_data_distill_eval_leave_everything_where_the_readme_says(box, pipeline):
    bucket = f"s3://{box.bucket}"
    shards = storage.glob(f"{bucket}/data/shards/*.tar")
    assert shards and storage.exists(f"{bucket}/data/manifest.parquet") and storage.exists(f"{bucket}/data/rejects.parquet")
    assert storage.exists(f"{bucket}/data/syncnet/syncnet.pt")  # trained beside the shards, not on the head
    for stage in ("teacher_base", "teacher", "student", "dmd"):
        assert storage.exists(f"{bucket}/distill/{stage}/dit.safetensors"), stage
    # the registered SyncNet sits behind the server's artifact proxy: the workers got a copy beside the run
    assert storage.glob(f"{bucket}/distill/models/syncnet-v*/syncnet.pt")
    report = json.loads(storage.read_text(f"{bucket}/eval/report.json"))
    assert report["clips"] and storage.exists(f"{bucket}/eval/report.md")

    client = mlflow.tracking.MlflowClient()
    syncnet = client.get_model_version_by_alias("syncnet", "champion")
    student = client.get_model_version_by_alias("lipforcing-student", "candidate")
    for version in (syncnet, student):  # MLflow models naming their weights files, which the proxy holds
        assert version.source.startswith("models:/") and version.tags["weights"].startswith("mlflow-artifacts:")
    assert storage.glob(f"{bucket}/mlflow/*/*/artifacts/dit.safetensors")  # the proxy stored it in the bucket
    # eval ran on a worker node (a GPU one when the cluster has GPUs), not on the head
    evaluation = mlflow.get_run(report["mlflow_run_id"])
    head = next(n["node_id"] for n in box.nodes() if n["is_head_node"])
    assert evaluation.data.tags["ray_node"] not in ("", head)
    assert "running evaluate_here on a CPU worker" in pipeline["eval"]
    # a training run holds the system metrics of the worker nodes its workers ran on (Ray Train packs
    # the 2 workers, so one node or two), never the head's
    experiment = [evaluation.info.experiment_id]
    parent = client.search_runs(experiment, f"tags.job = 'distill' and params.output = '{bucket}/distill'")[0]
    dmd = client.search_runs(experiment, f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'dmd'")[0]
    nodes = {key.split("/")[1] for key in dmd.data.metrics if key.startswith("system/")}
    assert 1 <= len(nodes) <= 2 and not any(node.endswith(head[:6]) for node in nodes), nodes
    assert all(dmd.data.metrics[f"system/{node}/system_memory_usage_megabytes"] > 0 for node in nodes)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def replace_a_worker(box, victim: str) -> None:
    """A worker node dies (SIGKILL to its raylet and every process it started); then a new one joins,
    as an autoscaler or a rescheduled pod brings capacity back."""
    box.kill_node(victim)
    box.add_node(f"worker-{time.monotonic_ns()}")


def finish(process: subprocess.Popen, timeout: float = 1200) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-6000:]
    return output


# Ray Data's name for a call of an ingest actor (one task of the data job).
INGEST_CALL = "MapWorker(MapBatches(IngestWorker)).submit"


def test_a_worker_node_dies_mid_data_job(box, pipeline):
    """Node loss during ingest: the lost task reruns elsewhere (on a replacement node) and the job
    ends with exactly the segments of the undisturbed run of the same clips, no duplicates, no gaps."""
    from collections import Counter

    from data_jobs.manifest import read_table

    bucket = f"s3://{box.bucket}"
    # Enough work that the job is still running when the first task commits: each clip of the
    # undisturbed run four times over (new names, so new keys), two inputs per task, four times as
    # many tasks as ingest actors. The node dies once a task has committed while the job goes on:
    # every actor is then busy, so the dying node takes a running task with it. The state API reports
    # task states late, so the victim is picked by its live actor, not by a task seen running.
    copies = 4
    for copy in range(copies):
        for name in CLIPS:
            storage.write_bytes(f"{bucket}/raw-kill/videos/c{copy}_{name}", storage.read_bytes(f"{bucket}/raw/videos/{name}"))
    args = f"input={bucket}/raw-kill output={bucket}/data-kill execution.progress=false write.inputs_per_task=2"
    args += f" score.syncnet={bucket}/data/syncnet/syncnet.pt"  # the undisturbed run's SyncNet: the same verdicts
    job = make(box, "data", args, wait=False)

    def mid_job() -> list[dict]:
        assert job.poll() is None, "the data job ended before a node could be killed in its middle"
        if not storage.glob(f"{bucket}/data-kill/aligned/stats/*.json"):
            return []
        return box.actors("IngestWorker")

    deadline = time.monotonic() + 900
    while not (actors := mid_job()):
        assert time.monotonic() < deadline, "timed out waiting for a committed ingest task while the job goes on"
        time.sleep(1)
    running = actors[0]
    victim = box.node_of(running["node_id"])
    replace_a_worker(box, victim)
    finish(job)
    tasks = len(storage.glob(f"{bucket}/data-kill/aligned/stats/*.json"))
    calls = [t for t in box.tasks(INGEST_CALL) if t["job_id"] == running["job_id"]]  # one entry per call or attempt
    assert len(calls) > tasks, "the killed node's task was not run again"
    killed, undisturbed = read_table(f"{bucket}/data-kill/manifest.parquet"), read_table(f"{bucket}/data/manifest.parquet")

    def segments(table, copy_prefix: bool) -> Counter:
        """(clip, segment start) of each row; a copy counts as the clip it copies."""
        names = [source.rsplit("/", 1)[1].split("_", 1)[1] if copy_prefix else source.rsplit("/", 1)[1] for source in table["source"]]
        return Counter(zip(names, table["start_s"].round(3)))

    assert segments(killed, True) == Counter({seg: n * copies for seg, n in segments(undisturbed, False).items()})
    members = [name for url in storage.glob(f"{bucket}/data-kill/shards/*.tar") for name in _tar_keys(url)]
    assert sorted(members) == sorted(killed["key"]) and len(set(members)) == len(members)  # each sample once


def _tar_keys(url: str) -> list[str]:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url))) as tar:
        return sorted({member.name.split(".", 1)[0] for member in tar.getmembers()})


def test_a_worker_node_dies_mid_distill_stage(box, pipeline):
    """Node loss during DMD (one of the two training workers dies with its node): Ray Train restarts
    the group on the surviving and a replacement node from the last checkpoint; the iteration
    counter and the 5:1 optimizer-step counters continue, in the same MLflow run."""
    bucket = f"s3://{box.bucket}"
    for stage in ("teacher", "student"):
        storage.write_bytes(f"{bucket}/distill-kill/{stage}/dit.safetensors", storage.read_bytes(f"{bucket}/distill/{stage}/dit.safetensors"))
    args = f"data={bucket}/data output={bucket}/distill-kill stages=[dmd] dmd.train.steps=8 dmd.train.checkpoint_every=2"
    job = make(box, "distill", args, wait=False)

    client = mlflow.tracking.MlflowClient()

    def dmd_run():
        runs = mlflow.search_runs(experiment_names=["lipforcing"], filter_string="tags.ray_run = 'distill-dmd'", output_format="list")
        return next((r for r in runs if r.data.tags.get("lipforcing.resume_key", "").startswith(f"{bucket}/distill-kill")), None)

    def past_a_checkpoint() -> bool:
        """Iteration 2 is checkpointed and iteration 3 logged: work the restart must redo."""
        progress = storage.glob(f"{bucket}/distill-kill/ray/distill-dmd/checkpoint_*/progress.json")
        run = dmd_run() if any(json.loads(storage.read_text(p))["iteration"] >= 2 for p in progress) else None
        return run is not None and any(m.step >= 3 for m in client.get_metric_history(run.info.run_id, "fake_score_loss"))

    wait_for(past_a_checkpoint, 900, "a DMD checkpoint and one more iteration")
    training_nodes = sorted({actor["node_id"] for actor in box.actors("RayTrainWorker")})
    assert len(training_nodes) == 2  # one training worker per worker node
    replace_a_worker(box, box.node_of(training_nodes[0]))
    output = finish(job)
    run = dmd_run()
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "fake_score_loss")]
    assert sorted(set(logged)) == list(range(1, 9)), output[-3000:]
    resumed = [int(n) for n in re.findall(r"\[dmd\] resumed from iteration (\d+)", output)]
    assert resumed and all(n >= 2 and n % 2 == 0 for n in resumed), output[-3000:]  # from a checkpoint, not from 0
    fake = sorted(client.get_metric_history(run.info.run_id, "optimizer_steps/fake_score"), key=lambda m: m.step)
    student = sorted(client.get_metric_history(run.info.run_id, "optimizer_steps/student"), key=lambda m: m.step)
    assert fake[-1].value == 8 and student[-1].value == 2  # iterations 0 and 5 updated the student
    latest = max(storage.glob(f"{bucket}/distill-kill/ray/distill-dmd/checkpoint_*/progress.json"),
                 key=lambda p: json.loads(storage.read_text(p))["iteration"])  # fmt: skip
    assert json.loads(storage.read_text(latest))["optimizer_steps"] == {"student": 2, "fake_score": 8}
    assert storage.exists(f"{bucket}/distill-kill/dmd/dit.safetensors")


def test_make_retrain_on_the_cluster_and_its_tracking_server(box, pipeline):
    """`make retrain` submitted to the box: the cycle's data, distill and eval jobs run on the workers,
    everything lives on s3:// and in the tracking server; with no champion yet the challenger is
    promoted, the decision is a run in the server, and a rerun finds nothing new. Then `make compare`
    reads the server and logs its report there."""
    import pandas as pd

    bucket = f"s3://{box.bucket}"
    videos = [name for name in CLIPS if not name.startswith("bad_")]
    uploads = pd.DataFrame({"video": [f"{bucket}/raw/videos/{name}" for name in videos], "dataset": "hdtf",
                            "identity": videos, "split": ["heldout" if name.startswith("hdtf_") else "train" for name in videos]})  # fmt: skip
    storage.write_text(f"{bucket}/uploads/list.csv", uploads.to_csv(index=False))
    fast = ",".join(STEPS.split())
    args = (f"input={bucket}/uploads/list.csv root={bucket}/retrain date=2026-11-30 data_args=[score.enabled=false,execution.progress=false] "
            f"distill_args=[{fast}] eval_args=[clips=1,max_frames=33,samples=0]")  # fmt: skip
    first = make(box, "retrain", args).stdout
    assert "retrain cycle 2026-11-30: promoted: no champion yet" in first, first[-3000:]
    state = json.loads(storage.read_text(f"{bucket}/retrain/retrain.json"))
    assert [(c["run"], c["decision"]) for c in state["cycles"]] == [("2026-11-30", "promoted")]
    client = mlflow.tracking.MlflowClient()
    champion = client.get_model_version_by_alias("lipforcing-student", "champion")
    assert champion.tags["promotion.decision"] == "promoted" and champion.tags["weights"].startswith("mlflow-artifacts:")
    [decision] = mlflow.search_runs(experiment_names=["lipforcing"], filter_string="tags.job = 'retrain'", output_format="list")
    assert decision.data.tags["retrain.decision"] == "promoted" and decision.data.params["challenger"].endswith(f"/{champion.version}")
    assert storage.exists(f"{bucket}/retrain/runs/2026-11-30/eval/challenger/report.json")
    again = make(box, "retrain", args).stdout
    assert "nothing to do" in again, again[-3000:]
    report = make(box, "compare", f"output={bucket}/compare").stdout
    assert storage.exists(f"{bucket}/compare/report.html") and "compared" in report
    [compare_run] = mlflow.search_runs(experiment_names=["lipforcing"], filter_string="tags.job = 'compare'", output_format="list")
    assert "report.html" in {a.path for a in client.list_artifacts(compare_run.info.run_id)}


def test_status_logs_and_stop_act_on_the_last_submitted_job(box, pipeline):
    env = user_env(box)
    checked = subprocess.run([sys.executable, "-m", "pipelines.cluster_check"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert checked.returncode == 0
    last = json.loads((REPO_ROOT / "outputs" / "last_job.json").read_text())
    status = subprocess.run(["make", "-s", "status"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert f"{last['job_id']} on {last['address']}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    logs = subprocess.run(["make", "-s", "logs"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "cluster check: ok" in logs.stdout  # the job's own output, read again

    running = make(box, "distill", f"data=s3://{box.bucket}/data output=s3://{box.bucket}/distill-stop", wait=False)
    wait_for(lambda: json.loads((REPO_ROOT / "outputs" / "last_job.json").read_text())["job_id"] != last["job_id"], 120, "the submission")
    stopped = subprocess.run(["make", "-s", "stop"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "stop requested" in stopped.stdout, stopped.stdout + stopped.stderr
    running.communicate(timeout=300)
    assert running.returncode != 0  # the submitter reports the stopped job as not succeeded
    wait_for(lambda: "STOPPED" in subprocess.run(["make", "-s", "status"], cwd=REPO_ROOT, env=env, capture_output=True, text=True).stdout,
             120, "the job to stop")  # fmt: skip
