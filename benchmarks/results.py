"""What every benchmark shares: the machine line and writing its own section of RESULTS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine(threads: int | None = None) -> str:
    """One line naming the machine a section was measured on, and how busy it was."""
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    thread_count = "" if threads is None else f", {threads} torch thread{'s' if threads != 1 else ''}"
    return (
        f"{model} ({platform.machine()}), nproc {os.cpu_count()} shared with other engineers' jobs (noisy), "
        f"torch {torch.__version__}{thread_count}; 1-min load average {os.getloadavg()[0]:.1f} when the run ended"
    )


def report(section: str, heading: str, write: bool) -> str:
    """Print a benchmark's section and, with `--write`, put it into RESULTS.md; returns it."""
    print(section)
    if write:
        write_section(section, heading)
    return section


def write_section(section: str, heading: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section under `heading`, leaving every other section as it is."""
    lines = (path.read_text() if path.exists() else "# Benchmark results\n").splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section.rstrip("\n").splitlines() + ([""] if end < len(lines) else [])
    else:
        lines += ["", *section.rstrip("\n").splitlines()]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def s3_server() -> tuple[str, dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with one bucket, and the variables that point a job at it."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port).start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="bench")
    return "s3://bench", env
