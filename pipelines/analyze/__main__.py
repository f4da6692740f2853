"""`python -m pipelines.analyze ...`: the teacher-trajectory analysis from the command line (see `job`)."""

import sys

from pipelines.analyze.config import AnalyzeConfig, validate
from pipelines.analyze.job import analyze
from pipelines.jobs import run_job

sys.exit(run_job("pipelines.analyze", AnalyzeConfig, analyze, validate=validate))
