"""The champion/challenger gate: the rule on planted numbers, and its record in a real MLflow registry."""

from __future__ import annotations

import json
import math
import os

import mlflow
import pytest

from lipforcing.config import ConfigError, load_config
from pipelines import tracking
from pipelines.promotion import PromotionRule, current_champion, decide, record, validate_rule, worsening

CHAMPION = {"sync_c": 5.0, "ssim": 0.80, "fvd": 200.0}


def test_directions_of_the_metrics_the_paper_reports():
    """Sync-C and SSIM: higher is better; Sync-D and FVD: lower is better (a sign that could flip silently)."""
    assert worsening("sync_c", 4.0, 5.0) == pytest.approx(1.0)
    assert worsening("ssim", 0.9, 0.8) == pytest.approx(-0.1)
    assert worsening("sync_d", 8.0, 7.0) == pytest.approx(1.0)
    assert worsening("fvd", 150.0, 200.0) == pytest.approx(-50.0)


@pytest.mark.parametrize(
    ("challenger", "promoted", "words"),
    [
        ({"sync_c": 4.95, "ssim": 0.81, "fvd": 210.0}, True, "ssim better"),  # Sync-C 0.05 down, within 0.1
        ({"sync_c": 4.85, "ssim": 0.81, "fvd": 150.0}, False, "sync_c 4.85 vs 5 (worse by 0.15"),  # 0.15 down
        ({"sync_c": 5.50, "ssim": 0.80, "fvd": 200.0}, False, "none of ['fvd', 'ssim'] is better"),  # ties improve nothing
        ({"sync_c": 5.00, "ssim": 0.8005, "fvd": 199.5}, False, "ssim 0.8005 vs 0.8 (needs a gain over 0.001)"),  # noise
        ({"sync_c": 5.00, "ssim": 0.70, "fvd": 190.0}, True, "fvd better"),  # FVD alone is enough
    ],
)
def test_the_default_rule(challenger, promoted, words):
    """Sync-C not worse by more than 0.1, and FVD better by over 1 or SSIM by over 0.001."""
    decision = decide(challenger, CHAMPION, PromotionRule())
    assert decision.promote is promoted and words in decision.reason


def test_a_metric_measured_for_one_side_only_is_not_compared():
    """No FVD weights for the champion's eval: only SSIM can show the improvement; a guarded metric
    that is missing (or NaN) refuses, since the tolerance cannot be checked."""
    rule = PromotionRule()
    one_sided = decide({"sync_c": 5.0, "ssim": 0.79, "fvd": 10.0}, {"sync_c": 5.0, "ssim": 0.8}, rule)
    assert not one_sided.promote and one_sided.reason.startswith("none of ['ssim'] is better by its margin")
    refused = decide({"sync_c": math.nan, "ssim": 0.9}, {"sync_c": 5.0, "ssim": 0.8}, rule)
    assert not refused.promote and "sync_c was not measured for both" in refused.reason
    nothing = decide({"sync_c": 5.0}, {"sync_c": 5.0}, rule)
    assert not nothing.promote and "none of ['fvd', 'ssim'] was measured for both" in nothing.reason


def test_no_champion_and_the_modes():
    assert decide({"ssim": 0.1}, None, PromotionRule()).promote  # the first model becomes champion
    worse = {"sync_c": 0.0, "ssim": 0.0}
    assert decide(worse, CHAMPION, PromotionRule(mode="always")).promote
    assert not decide({"sync_c": 9.0, "ssim": 0.99}, CHAMPION, PromotionRule(mode="never")).promote


def test_rules_are_config_with_named_errors():
    rule = load_config(PromotionRule, overrides=["tolerances.sync_d=0.5", "better_any=[fid]"])
    assert rule.tolerances == {"sync_c": 0.1, "sync_d": 0.5} and rule.better_any == ["fid"]
    with pytest.raises(ConfigError, match=r"'promotion.tolerances' names \['lpips'\]"):
        validate_rule(PromotionRule(tolerances={"lpips": 0.1}), "promotion")
    with pytest.raises(ConfigError, match="'promotion.better_any'"):
        validate_rule(PromotionRule(better_any=["accuracy"]), "promotion")
    with pytest.raises(ConfigError, match=r"'promotion.tolerances' has \{'sync_c': -1.0\}"):
        validate_rule(PromotionRule(tolerances={"sync_c": -1.0}), "promotion")
    with pytest.raises(ConfigError, match=r"'promotion.tolerances' has \{'sync_c': nan\}"):
        validate_rule(PromotionRule(tolerances={"sync_c": math.nan}), "promotion")  # NaN would never fail
    with pytest.raises(ConfigError, match="'promotion.min_gain' names"):
        validate_rule(PromotionRule(min_gain={"lpips": 0.1}), "promotion")
    with pytest.raises(ConfigError, match="mode"):
        load_config(PromotionRule, overrides=["mode=sometimes"])


@pytest.mark.integration
def test_a_decision_moves_the_alias_only_when_promoted_and_is_recorded(tmp_path, monkeypatch):
    """In a real SQLite registry: each new version becomes @challenger; @champion moves only on a
    promotion; the version and the active run carry the decision and the numbers."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # MLflow keeps the last store it was pointed at
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"planted")
    name = "gated"
    client = mlflow.tracking.MlflowClient()
    versions = []
    with tracking.start_run("trainer") as run:
        mlflow.log_artifact(str(weights))
    client.create_registered_model(name)
    for _ in range(2):
        versions.append(str(client.create_model_version(name, f"{run.info.artifact_uri}/w.bin", run_id=run.info.run_id).version))
    assert current_champion(name) == ""
    with tracking.start_run("retrain") as gate_run:
        record(decide(CHAMPION, None, PromotionRule()), name, versions[0])
    assert current_champion(name) == versions[0]
    worse = {"sync_c": 3.0, "ssim": 0.9, "fvd": 100.0}
    with tracking.start_run("retrain") as gate_run:
        record(decide(worse, CHAMPION, PromotionRule()), name, versions[1], versions[0])
    assert current_champion(name) == versions[0]  # refused: the champion stays
    assert str(client.get_model_version_by_alias(name, "challenger").version) == versions[1]
    tags = client.get_model_version(name, versions[1]).tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.champion_before"] == versions[0]
    assert "sync_c 3 vs 5" in tags["promotion.reason"]
    assert json.loads(tags["promotion.numbers"]) == {"challenger": worse, "champion": CHAMPION}
    logged = client.get_run(gate_run.info.run_id).data
    assert logged.tags["promotion.decision"] == "refused"
    assert logged.metrics["challenger.sync_c"] == 3.0 and logged.metrics["champion.fvd"] == 200.0


def test_an_unreachable_registry_is_not_read_as_no_champion(monkeypatch):
    """Taken for "no champion", an outage would let the next model replace the champion unchecked."""
    from tests.conftest import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")  # conftest points MLflow back after the test
    with pytest.raises(mlflow.exceptions.MlflowException):
        current_champion("lipforcing-student")
