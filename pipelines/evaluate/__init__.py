"""`make eval`: stream a trained student over held-out clips, score it, report, log to MLflow.

One concept per module: `config` (what is evaluated and how), `clips` (the held-out clips cut to what
the student generates), `runner` (the models and the per-clip measurements), `report` (the table and
how each number is measured) and `job` (the command-line job). The names other code uses are here.
"""

from pipelines.evaluate.clips import EvalClip, eval_length, heldout_shards, prepare_clip
from pipelines.evaluate.config import TINY_WARNING, EvalConfig, validate
from pipelines.evaluate.job import evaluate, evaluate_here, run_eval
from pipelines.evaluate.report import render_markdown
from pipelines.evaluate.runner import Evaluator, FeatureSets, Generation, evaluate_clip

__all__ = [
    "TINY_WARNING", "EvalClip", "EvalConfig", "Evaluator", "FeatureSets", "Generation", "eval_length", "evaluate",
    "evaluate_clip", "evaluate_here", "heldout_shards", "prepare_clip", "render_markdown", "run_eval", "validate",
]  # fmt: skip
