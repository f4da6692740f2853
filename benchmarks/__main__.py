"""`make bench`: run every benchmark, each in its own process, each writing its section of RESULTS.md.

    make bench                                # memory, model, speed, infer, sync, train, loader, learn, bookkeeping, data (data last: the slowest)
    make bench ARGS="only=sync,train"         # a subset, still in the fixed order
    make bench ARGS="write=false"             # print the sections, leave RESULTS.md alone
    make bench ARGS="data=/tmp/lf_data"       # shards for the training benchmark's per-stage part

A fresh process per benchmark keeps thread settings, Ray and memory high-water marks apart.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.results import RESULTS
from lipforcing.config import ConfigError, load_config

ORDER = ("memory", "model", "speed", "infer", "sync", "train", "loader", "learn", "bookkeeping", "data")
HEADER = [
    "# Benchmark results",
    "",
    "Measured numbers from `make bench` (benchmarks/bench_*.py), one section per benchmark, each naming "
    "its machine and the exact command. Machines are shared and noisy: compare ratios within a section "
    "(measured side by side in one run), not absolute numbers across sections or machines.",
]


@dataclass
class BenchConfig:
    only: str = ""  # comma-separated names from ORDER; empty runs all
    write: bool = True  # false: print the sections only
    data: str = "outputs/data"  # shard folder for the training benchmark's per-stage part


def parse_args(argv: Sequence[str]) -> BenchConfig:
    """`key=value` arguments into a validated `BenchConfig` (unknown keys and names are errors)."""
    config = load_config(BenchConfig, overrides=list(argv))
    unknown = [name for name in selected(config) if name not in ORDER]
    if unknown:
        raise ConfigError(f"config key 'only' has {unknown}; allowed values: {', '.join(ORDER)}")
    return config


def selected(config: BenchConfig) -> list[str]:
    """The benchmarks to run, always in ORDER (unknown names kept so `parse_args` can reject them)."""
    names = [name.strip() for name in config.only.split(",") if name.strip()]
    if not names:
        return list(ORDER)
    return [name for name in ORDER if name in names] + [name for name in names if name not in ORDER]


def command(name: str, config: BenchConfig) -> list[str]:
    """The subprocess that runs one benchmark."""
    argv = [sys.executable, "-m", f"benchmarks.bench_{name}"]
    if config.write:
        argv.append("--write")
    if name == "train":
        argv += ["--data", config.data]
    return argv


def write_header(path: Path = RESULTS) -> None:
    """Put the header above the first section, keeping every section as it is."""
    lines = path.read_text().splitlines() if path.exists() else []
    first = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    path.write_text("\n".join([*HEADER, "", *lines[first:]]).rstrip("\n") + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if config.write:
        write_header()
    failed = []
    for name in selected(config):
        print(f"[bench] {name}: {' '.join(command(name, config)[1:])}", flush=True)
        if subprocess.run(command(name, config)).returncode != 0:
            failed.append(name)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
