"""`make retrain` end to end on real services: two cycles in a SQLite MLflow store on the local Ray,
the first promoting (there is no champion), the second refused (its student is no better by
construction), a same-day rerun with no new data that does nothing, and a dry run that changes nothing."""

from __future__ import annotations

import json
import os

import mlflow
import pandas as pd
import pytest

from lipforcing.config import ConfigError
from pipelines.jobs import resolve_config
from pipelines.retrain import RetrainConfig, State, deliver_sample_upload, retrain

pytestmark = pytest.mark.integration
NAME = "lipforcing-student"
# Short stages: this pins the cycle's logic, not what the tiny models learn.
FAST = [
    "distill_args=[teacher.base.steps=4,teacher.train.steps=2,student.train.steps=2,dmd.train.steps=2]",
    "eval_args=[clips=2,max_frames=33,samples=0]",
]
# The second cycle's student is no better than the champion by construction: fine-tuned with a zero
# learning rate it is the champion's weights again, so the same eval gives the same numbers. (The tiny
# profile's random-init models score at the floor, SSIM ~0.001, so "worse" cannot be made reliably.)
NO_BETTER = "distill_args=[dmd.train.steps=2,dmd.train.lr=0.0]"


def write_upload(sample_list: str, inbox: str, datasets_left_out: tuple[str, ...]) -> None:
    """The raw-upload list a scheduler would find: the sample's rows (absolute paths) but some datasets."""
    rows = pd.read_csv(sample_list, keep_default_na=False)
    folder = os.path.dirname(sample_list)
    for column in ("video", "audio"):
        rows[column] = [os.path.join(folder, path) if path else "" for path in rows[column]]
    rows[~rows["dataset"].isin(datasets_left_out)].to_csv(inbox, index=False)


def versions() -> list[str]:
    return sorted(v.version for v in mlflow.tracking.MlflowClient().search_model_versions(f"name='{NAME}'"))


def retrain_runs() -> list:
    return mlflow.search_runs(experiment_names=["lipforcing"], filter_string="tags.job = 'retrain'", output_format="list")


def test_two_cycles_one_promotion_one_refusal_and_an_idempotent_rerun(sample_list, local_ray, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    root, inbox = str(tmp_path / "retrain"), str(tmp_path / "inbox.csv")
    client = mlflow.tracking.MlflowClient()

    def run(*args: str) -> int:
        return retrain(resolve_config(RetrainConfig, [f"input={inbox}", f"root={root}", *FAST, *args]))

    # Cycle 1: the first upload (no VoxCeleb2 clips yet), no champion: distilled in full and promoted.
    write_upload(sample_list, inbox, ("voxceleb2",))
    assert run("date=2026-11-30") == 0
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.version == 1 and champion.tags["promotion.decision"] == "promoted"
    assert champion.tags["promotion.reason"] == "no champion yet: the first model becomes it"
    first = retrain_runs()
    assert len(first) == 1 and first[0].data.tags["retrain.decision"] == "promoted"
    assert first[0].data.params["challenger"] == f"models:/{NAME}/1" and first[0].data.params["champion"] == "none"
    assert os.path.exists(f"{root}/runs/2026-11-30/distill/dmd/dit.safetensors")
    teacher = champion.tags["upstream.teacher"]
    assert teacher == f"{root}/runs/2026-11-30/distill/teacher/dit.safetensors"

    # The same day again, nothing new: nothing runs, nothing is registered, and it says so.
    capsys.readouterr()
    assert run("date=2026-11-30") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert versions() == [1] and len(retrain_runs()) == 1 and len(State(root).cycles) == 1

    # New VoxCeleb2 clips arrive. A dry run names the work and changes nothing.
    write_upload(sample_list, inbox, ())
    state_before = State(root).values
    assert run("date=2026-12-07", "dry_run=true") == 0
    said = capsys.readouterr().out
    assert "would ingest 3 new of 15 inputs" in said and f"fine-tune models:/{NAME}/1 (@champion)" in said
    assert State(root).values == state_before and versions() == [1]

    # Cycle 2: the champion fine-tuned on the grown data, no better by construction: refused, champion kept.
    assert run("date=2026-12-07", NO_BETTER) == 0
    assert client.get_model_version_by_alias(NAME, "champion").version == 1
    challenger = client.get_model_version_by_alias(NAME, "challenger")
    assert challenger.version == 2 and challenger.tags["promotion.decision"] == "refused"
    assert challenger.tags["upstream.student.version"] == f"{NAME}/1"  # fine-tuned from the champion ...
    assert challenger.tags["upstream.teacher"] == teacher  # ... with the teacher it was distilled with
    numbers = json.loads(challenger.tags["promotion.numbers"])
    for metric in ("ssim", "sync_c", "sync_d", "mouth_l1"):  # the construction holds: the same student, the same eval
        assert numbers["challenger"][metric] == numbers["champion"][metric], metric
    assert challenger.tags["promotion.reason"].startswith("none of ['ssim'] is better by its margin")  # no FVD weights here
    second = [r for r in retrain_runs() if r.data.tags["retrain.run"] == "2026-12-07"]
    assert len(second) == 1 and second[0].data.tags["retrain.decision"] == "refused"
    assert second[0].data.metrics["champion.ssim"] == pytest.approx(numbers["champion"]["ssim"])
    cycles = State(root).cycles
    assert [(c["run"], c["status"], c["decision"]) for c in cycles] == [("2026-11-30", "done", "promoted"), ("2026-12-07", "done", "refused")]
    # An upload whose one file is rejected: a cycle that trains nothing, and says why in MLflow.
    broken = tmp_path / "upload3.mp4"
    broken.write_bytes(b"not a video" * 100)
    rows = pd.read_csv(inbox, keep_default_na=False)
    pd.concat([rows, rows.iloc[:1].assign(video=str(broken), audio="")]).to_csv(inbox, index=False)
    assert run("date=2026-12-14") == 0
    third = [r for r in retrain_runs() if r.data.tags["retrain.run"] == "2026-12-14"]
    assert len(third) == 1 and third[0].data.tags["retrain.decision"] == "no_new_samples"
    assert versions() == [1, 2] and State(root).cycles[-1]["decision"] == "no_new_samples"
    # both students were judged on the one held-out split the first upload brought
    reports = [json.load(open(f"{root}/runs/2026-12-07/eval/{side}/report.json")) for side in ("challenger", "champion")]
    keys = [[clip["key"] for clip in report["clips"]] for report in reports]
    assert keys[0] == keys[1] and all(key.startswith("hdtf_t1c_24fps_long") for key in keys[0])


def test_the_embedded_default_delivers_the_sample_in_two_uploads(sample_list, tmp_path, monkeypatch):
    """With no input, the sample arrives as two uploads: the held-out identity with the first, the
    VoxCeleb2 clips with the second, each only once the last was trained on."""
    monkeypatch.setattr("pipelines.retrain.DEFAULT_INPUT", sample_list)
    inbox = str(tmp_path / "inbox.csv")
    assert deliver_sample_upload(inbox, 0, trained=False) == 1
    first = pd.read_csv(inbox, keep_default_na=False)
    assert "voxceleb2" not in set(first["dataset"]) and "heldout" in set(first["split"])
    assert all(os.path.isabs(v) and os.path.exists(v) for v in first["video"])
    assert deliver_sample_upload(inbox, 1, trained=False) == 1  # not trained on yet: nothing arrives
    assert len(pd.read_csv(inbox)) == len(first)
    assert deliver_sample_upload(inbox, 1, trained=True) == 2
    everything = pd.read_csv(inbox, keep_default_na=False)
    assert len(everything) == len(pd.read_csv(sample_list)) and set(everything["dataset"]) - set(first["dataset"]) == {"voxceleb2"}
    assert deliver_sample_upload(inbox, 2, trained=True) == 2  # nothing more arrives
    assert len(pd.read_csv(inbox)) == len(everything)


@pytest.mark.parametrize(("arg", "key"), [("date=2026-02-30", "'date'"), ("distill_args=[steps]", "'distill_args'"),
                                          ("promotion.better_any=[lpips]", "'promotion.better_any'"),
                                          ("distill_args=[dmd.registered_alias=champion]", "'distill_args' sets"),
                                          ("eval_args=[student_weights=x]", "'eval_args' sets"),
                                          ("profile=1.3b", "'distill_args': config keys .*dit_weights"),
                                          ("root=s3://bucket/retrain", "'input' is empty")])  # fmt: skip
def test_config_errors_name_the_key(arg, key):
    from pipelines.retrain import validate

    with pytest.raises(ConfigError, match=key):
        validate(resolve_config(RetrainConfig, [arg]))


def test_a_missing_input_is_an_error_not_nothing_new(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(ConfigError, match="'input' is .* which does not exist"):
        retrain(resolve_config(RetrainConfig, [f"input={tmp_path}/no-such-bucket/", f"root={tmp_path}/r"]))


def test_an_unfinished_cycle_is_resumed_or_abandoned_and_runs_never_reuse_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    root = str(tmp_path / "r")
    state = State(root)
    state.cycles.append({"run": "2026-11-30", "status": "running"})
    state.save()
    assert retrain(resolve_config(RetrainConfig, [f"root={root}", "dry_run=true"])) == 0
    assert "cycle 2026-11-30 did not finish; would resume it" in capsys.readouterr().out
    assert retrain(resolve_config(RetrainConfig, [f"root={root}", "abandon=true"])) == 0
    assert State(root).cycles[0]["status"] == "abandoned" and State(root).unfinished() is None
    os.makedirs(f"{root}/runs/2026-12-01.2")  # a folder the state does not know of (a lost state file)
    assert State(root).new_run("2026-11-30", root) == "2026-11-30.2"
    assert State(root).new_run("2026-12-01", root) == "2026-12-01"
    os.makedirs(f"{root}/runs/2026-12-01")
    assert State(root).new_run("2026-12-01", root) == "2026-12-01.3"
