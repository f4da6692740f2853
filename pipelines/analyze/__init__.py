"""`make analyze`: `config` (teacher, clips, grid, rules), `worker` (one clip's runs, scored, as a Ray
task), `plots` (the figures), `job` (the command-line job)."""

from pipelines.analyze.config import AnalyzeConfig, validate
from pipelines.analyze.job import analyze

__all__ = ["AnalyzeConfig", "analyze", "validate"]
