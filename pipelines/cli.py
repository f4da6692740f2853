"""`lipforcing <command> [key=value ...]`: the console entry point; one command per make target."""

from __future__ import annotations

import runpy
import sys

COMMANDS = {
    "demo": "pipelines.demo",
    "data": "pipelines.data",
    "syncnet": "pipelines.syncnet",
    "encode": "pipelines.encode",
    "distill": "pipelines.distill",
    "eval": "pipelines.evaluate",
    "infer": "pipelines.infer",
    "app": "pipelines.app",
    "retrain": "pipelines.retrain",
    "compare": "pipelines.compare",
    "analyze": "pipelines.analyze",
    "bench": "benchmarks",
    "ui": "pipelines.ui",
    "cluster-check": "pipelines.cluster_check",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: lipforcing <{'|'.join(COMMANDS)}> [key=value ...]", file=sys.stderr)
        sys.exit(2)
    module = COMMANDS[sys.argv[1]]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
