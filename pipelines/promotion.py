"""The champion/challenger gate: whether a newly trained model replaces the one in use.

A new student (or SyncNet) is registered under `@challenger`; it becomes `@champion` only when a
configured rule holds on numbers measured for both on the same held-out data in the same run. Moving
`@champion` is the one thing that changes what every later job uses (the data filter, the DMD reward,
`make eval`), so it never happens silently: each decision, promoted or refused, is written to the
challenger's version tags (`promotion.*`) and to the MLflow run that made it, with its numbers.

The rule: every metric in `tolerances` may be worse than the champion's by at most its tolerance
(in the metric's own units), and at least one metric of `better_any` that both have must be better
by more than its `min_gain` (a mean SSIM up by 1e-7 is noise, not a better model). Which way is
better comes from `HIGHER_IS_BETTER` / `LOWER_IS_BETTER`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import mlflow

from lipforcing.config import ConfigError

HIGHER_IS_BETTER = frozenset({"sync_c", "ssim", "psnr", "mouth_psnr", "csim", "fps", "val_accuracy", "offset_recovery_rate"})
LOWER_IS_BETTER = frozenset({"sync_d", "fvd", "fid", "mouth_l1", "ttff_ms", "val_loss"})
CHAMPION, CHALLENGER = "champion", "challenger"
TAG = "promotion."  # prefix of the decision tags on a challenger's model version


@dataclass
class PromotionRule:
    """When a challenger replaces the champion (see the module docstring)."""

    # metric -> how much worse than the champion's the challenger's may be (0: not worse at all)
    tolerances: dict[str, float] = field(default_factory=lambda: {"sync_c": 0.1})
    # at least one of these, measured for both, must be better by more than its margin in `min_gain`
    better_any: list[str] = field(default_factory=lambda: ["fvd", "ssim"])
    # metric -> the least improvement that counts (0 or absent: any); below it is noise, not progress
    min_gain: dict[str, float] = field(default_factory=lambda: {"ssim": 0.001, "fvd": 1.0})
    # gate: apply the rule; always: promote whatever the numbers (logged as such); never: only register
    mode: Literal["gate", "always", "never"] = "gate"


def validate_rule(rule: PromotionRule, key: str) -> None:
    """Every metric the rule names must have a known direction (config key `key`)."""
    known = HIGHER_IS_BETTER | LOWER_IS_BETTER
    for name, metrics in (("tolerances", list(rule.tolerances)), ("better_any", rule.better_any), ("min_gain", list(rule.min_gain))):
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise ConfigError(f"config key '{key}.{name}' names {unknown}; allowed values: {', '.join(sorted(known))}")
    for name, values in (("tolerances", rule.tolerances), ("min_gain", rule.min_gain)):
        bad = {m: t for m, t in values.items() if not (math.isfinite(t) and t >= 0)}
        if bad:
            raise ConfigError(f"config key '{key}.{name}' has {bad}; allowed values: finite numbers >= 0")


def worsening(metric: str, challenger: float, champion: float) -> float:
    """How much worse the challenger is on `metric` (negative: better), in the metric's units."""
    return champion - challenger if metric in HIGHER_IS_BETTER else challenger - champion


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger: dict[str, float]
    champion: dict[str, float]

    @property
    def verdict(self) -> str:
        return "promoted" if self.promote else "refused"


def decide(challenger: Mapping[str, float], champion: Mapping[str, float] | None, rule: PromotionRule) -> Decision:
    """Apply `rule` to the two sets of numbers (`champion` None: there is none yet)."""
    ours, theirs = dict(challenger), dict(champion or {})
    if rule.mode == "always":
        return Decision(True, "promotion forced (rule mode 'always'), whatever the numbers", ours, theirs)
    if rule.mode == "never":
        return Decision(False, "promotion disabled (rule mode 'never'): registered as challenger only", ours, theirs)
    if champion is None:
        return Decision(True, "no champion yet: the first model becomes it", ours, theirs)
    failed, checked = [], []
    for metric, tolerance in sorted(rule.tolerances.items()):
        if not _measured(metric, ours, theirs):
            failed.append(f"{metric} was not measured for both, so the tolerance on it cannot be checked")
            continue
        worse = worsening(metric, ours[metric], theirs[metric])
        text = f"{metric} {ours[metric]:.4g} vs {theirs[metric]:.4g} (worse by {worse:.4g}, tolerance {tolerance:g})"
        (failed if worse > tolerance else checked).append(text)
    compared = [m for m in rule.better_any if _measured(m, ours, theirs)]
    improved = [m for m in compared if -worsening(m, ours[m], theirs[m]) > rule.min_gain.get(m, 0.0)]
    scores = ", ".join(f"{m} {ours[m]:.4g} vs {theirs[m]:.4g} (needs a gain over {rule.min_gain.get(m, 0.0):g})" for m in compared)
    if not compared:
        failed.append(f"none of {rule.better_any} was measured for both, so no improvement can be shown")
    elif not improved:
        failed.append(f"none of {compared} is better by its margin: {scores}")
    if failed:
        return Decision(False, "; ".join(failed), ours, theirs)
    return Decision(True, f"{', '.join(improved)} better ({scores}); within tolerance: {'; '.join(checked) or 'none set'}", ours, theirs)


def _measured(metric: str, *sides: Mapping[str, float]) -> bool:
    return all(metric in side and math.isfinite(side[metric]) for side in sides)


def record(decision: Decision, name: str, version: int | str, champion_version: str = "") -> None:
    """Apply the decision in the registry (`@champion` moves only when promoted; the version is
    `@challenger` either way) and write it to the version's tags and the active run, if any."""
    client = mlflow.tracking.MlflowClient()
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    tags = {"decision": decision.verdict, "reason": decision.reason[:5000], "champion_before": champion_version or "none",
            "numbers": json.dumps({"challenger": decision.challenger, "champion": decision.champion})[:5000]}  # fmt: skip
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), TAG + key, value)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    if mlflow.active_run() is not None:
        mlflow.set_tags({f"{TAG}{key}": value for key, value in tags.items() if key != "numbers"})
        mlflow.log_metrics({f"{side}.{metric}": value for side, numbers in (("challenger", decision.challenger), ("champion", decision.champion))
                            for metric, value in numbers.items() if math.isfinite(value)})  # fmt: skip
        mlflow.log_dict({"decision": decision.verdict, "reason": decision.reason, "challenger": decision.challenger,
                         "champion": decision.champion, "champion_version": champion_version}, "promotion.json")  # fmt: skip


def current_champion(name: str) -> str:
    """The version number `@champion` points at now, or "" when there is none. Any other registry
    error (an unreachable server) is raised: read as "no champion", it would let the next model
    replace the real one unchecked."""
    try:
        return str(mlflow.tracking.MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no such model / alias
            return ""
        raise
