"""`python -m pipelines.evaluate ...`: the eval job from the command line (see `job`)."""

import sys

from pipelines.evaluate.config import EvalConfig, validate
from pipelines.evaluate.job import evaluate
from pipelines.jobs import run_job

sys.exit(run_job("pipelines.evaluate", EvalConfig, evaluate, validate=validate))
