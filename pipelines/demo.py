"""`make demo`: the whole pipeline on the embedded default, the way a user would run it by hand.

    1. make data     generate the sample (good and deliberately bad clips) and shard it on a local
                     Ray: ingest -> train a tiny SyncNet on the aligned shards (no public weights can
                     be fetched) -> score (sync filter, AV-offset correction) -> final shards
    2. make distill  teacher (tiny base trained from random init, then LoRA) -> student (Diffusion
                     Forcing) -> DMD (Self Forcing rollout, Sync-Window CFG, SyncNet reward) on
                     Ray Train + DeepSpeed ZeRO-2 with 2 workers; registers lipforcing-student
    3. make eval     stream the student over the shards; Sync-C/Sync-D, SSIM, FPS, TTFF report

Everything lands under outputs/ and in the MLflow store that `make ui` opens. The tiny profile's
models are small and randomly initialised: this checks every code path, it is not a quality result.
Each step is the real job with its default config; `ARGS` here go to every step (e.g. `seed=1`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from lipforcing.config import ConfigError
from pipelines.jobs import configure_logging, resolve_config


def steps() -> list[tuple[str, type, Callable[[Any], int]]]:
    """(name, config schema, job entry point) in pipeline order."""
    from data_jobs.config import DataJobConfig
    from pipelines.data import main as data
    from pipelines.distill import distill
    from pipelines.distill_config import DistillConfig
    from pipelines.evaluate import EvalConfig, evaluate

    return [("data", DataJobConfig, data), ("distill", DistillConfig, distill), ("eval", EvalConfig, evaluate)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    plan = steps()
    try:  # every step's config is checked before the first one starts
        configs = [resolve_config(schema, argv) for _, schema, _ in plan]
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    for (name, _, run), config in zip(plan, configs):
        started = time.perf_counter()
        print(f"\n==== make demo: {name} ====", flush=True)
        status = run(config)
        if status:
            print(f"make demo: step '{name}' failed with status {status}", file=sys.stderr)
            return status
        print(f"==== {name} done in {time.perf_counter() - started:.0f} s ====", flush=True)
    print(
        "\nmake demo finished. Outputs: outputs/data (shards, manifest, rejects, syncnet/), "
        "outputs/distill, outputs/eval (report.md). MLflow: `make ui` -> http://127.0.0.1:5000"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
