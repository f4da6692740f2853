"""Imports flow one way: lipforcing <- data_jobs <- pipelines.

The library never imports the job packages, Ray or MLflow; the data stages never import pipelines.
Checked twice: every import statement in the source (function-level ones included), and a real
import of every module in a fresh interpreter where the packages above are made unimportable.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

FORBIDDEN = {
    "lipforcing": ("data_jobs", "pipelines", "benchmarks", "ray", "mlflow"),
    "data_jobs": ("pipelines", "benchmarks", "mlflow"),
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module a file imports, wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_statement_points_up_the_layers(package):
    offending = {
        str(path.relative_to(REPO_ROOT)): sorted(imported_packages(path) & set(FORBIDDEN[package]))
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
    }
    assert {file: names for file, names in offending.items() if names} == {}


BLOCKED_IMPORT = """
import importlib, pkgutil, sys
for name in sys.argv[2].split(","):
    sys.modules[name] = None  # `import name` fails; optional probes (find_spec) see it as absent
package = importlib.import_module(sys.argv[1])
for module in pkgutil.walk_packages(package.__path__, f"{sys.argv[1]}."):
    if not module.name.endswith("__main__"):
        importlib.import_module(module.name)
print("imported")
"""


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_every_module_imports_with_the_layers_above_blocked(package):
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT, package, ",".join(FORBIDDEN[package])],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("imported"), done.stderr[-3000:]


def test_training_code_does_not_import_job_entry_points():
    """The trainer and the stages are below the command-line jobs that run them (eval included)."""
    jobs = {"pipelines.evaluate", "pipelines.data", "pipelines.distill", "pipelines.syncnet", "pipelines.encode", "pipelines.demo"}
    training = [REPO_ROOT / "pipelines" / "trainer.py", REPO_ROOT / "pipelines" / "deepspeed_setup.py"]
    training += sorted((REPO_ROOT / "pipelines" / "stages").glob("*.py"))
    found = {}
    for path in training:
        modules = {
            node.module for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom) and node.module
        }
        if modules & jobs:
            found[path.name] = sorted(modules & jobs)
    assert found == {}


def test_a_cpu_ingest_worker_starts_without_torch():
    """Every ingest actor imports the job module when it starts; torch alone would add over a second
    to each start, and the CPU ingest path (dlib, sharpness) never needs it."""
    probe = (
        "import sys; import data_jobs.job as job; assert job.worker_device(0) == 'cpu'; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False"
