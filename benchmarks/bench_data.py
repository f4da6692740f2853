"""Data-job benchmark: ingest throughput vs a bare transcode, per-stage time, 1 vs 2 Ray workers.

    python -m benchmarks.bench_data                 # print the markdown section
    python -m benchmarks.bench_data --write         # also replace "## Data" in benchmarks/RESULTS.md
    python -m benchmarks.bench_data align.size=256  # any data-job override
    python -m benchmarks.bench_data --inputs real   # the real clips of ../shared/data/real
    python -m benchmarks.bench_data --repeat 3      # 3 copies of each clip (fixed costs amortised)

Inputs: the clips of the embedded sample that become training samples (generated into a temporary
folder, seed 0), or the real talking-head clips. Throughput is input clip-seconds per wall-second,
one run each, on a local Ray:
1. the ingest job (probe -> resample, then one decode per input streamed through shots -> faces ->
   align, then per segment faces -> iqa -> encode -> shards), two workers, one input per task;
2. a bare decode + resize to the crop size + H.264 encode of the same clips with the same encoder
   settings, two processes: what any transcode costs, the floor the job is compared with;
3. the job with one worker (execution.concurrency=1) for the scaling from 1 to 2 workers.
The bare transcode runs first and last; the ratio uses the faster of the two.
Per-stage time is the worker-seconds the job's stats record for each stage. A warm-up run first
starts both Ray workers and loads their face models; the load average is printed beside each run
because the 2 cores are shared.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.real_clips import write_real_list
from benchmarks.results import report
from lipforcing.data import SAMPLE_RATE

HEADING = "## Data"


def good_clips(clip_list: str, repeat: int = 1) -> str:
    """A list file with only the clips that yield samples (what a clean dataset looks like: the
    sample's marked ones, all real ones), each `repeat` times as copies under other names, so fixed
    costs (starting workers, loading models) weigh in the ratio as little as on a large dataset."""
    table = pd.read_csv(clip_list, keep_default_na=False)
    good = table[table["expect"].str.startswith("samples=")] if "expect" in table else table
    root = Path(clip_list).parent
    rows = []
    for copy in range(repeat):
        for row in good.to_dict("records"):
            if copy:
                for column in ("video", "audio"):
                    if isinstance(row[column], str) and row[column]:
                        name = str(root / f"copy{copy}_{Path(row[column]).name}")
                        shutil.copy(root / row[column], name)
                        row = {**row, column: name}
            rows.append(row)
    path = str(root / "bench.csv")
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def bare_transcode(video: str, audio: str | None, size: int, crf: int, preset: str) -> float:
    """Decode every frame, resize to size x size, encode H.264; returns the clip's seconds."""
    import cv2

    from data_jobs.media import VideoFrames, encode_mp4, probe_media, read_audio

    cv2.setNumThreads(1)
    reader = VideoFrames(video)
    count = len(reader.timestamps())
    frames = []
    for start in range(0, count, 64):
        for frame in reader.read(range(start, min(start + 64, count))):
            frames.append(cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA))
    reader.close()
    encode_mp4(np.stack(frames), probe_media(video).fps, crf, preset)
    read_audio(audio or video, SAMPLE_RATE)
    return probe_media(video).duration_s


def run_bare(list_url: str, size: int, crf: int, preset: str, workers: int = 2) -> tuple[float, float]:
    table = pd.read_csv(list_url)
    root = Path(list_url).parent
    jobs = [
        (str(root / v), str(root / a) if isinstance(a, str) and a else None)
        for v, a in zip(table["video"], table["audio"])
    ]
    started = time.perf_counter()
    # spawn, not fork: forking a process that has run decoders' thread pools can deadlock the children.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        seconds = sum(pool.map(bare_transcode, *zip(*jobs), *[[x] * len(jobs) for x in (size, crf, preset)]))
    return seconds, time.perf_counter() - started


def run_job(list_url: str, output: str, overrides: list[str], concurrency: int):
    from data_jobs.config import DataJobConfig
    from data_jobs.job import run_data_job
    from pipelines.jobs import resolve_config

    argv = [f"input={list_url}", f"output={output}", "write.inputs_per_task=1", "execution.progress=false"]
    config = resolve_config(DataJobConfig, [*argv, f"execution.concurrency={concurrency}", *overrides])
    return config, run_data_job(config)


def clip_list(folder: str, inputs: str) -> str:
    """The list file of the embedded sample (generated, seed 0) or of the real clips."""
    from data_jobs.sample import generate_sample

    if inputs == "real":
        os.makedirs(os.path.join(folder, "sample"))
        path = Path(folder) / "sample" / "real.csv"
        write_real_list(path)
        return str(path)
    return generate_sample(os.path.join(folder, "sample"), seed=0)


def measure(overrides: list[str], repeat: int = 1, inputs: str = "sample") -> str:
    import ray

    from pipelines.ray_cluster import init_ray

    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        clips = good_clips(clip_list(folder, inputs), repeat)
        init_ray(num_cpus=2)
        try:
            # Warm-up: both workers start and load their face models before anything is timed.
            table = pd.read_csv(clips)
            warm = table.loc[table["video"].map(lambda v: os.path.getsize(Path(clips).parent / v)).nsmallest(2).index]
            warm.to_csv(os.path.join(folder, "sample", "warm.csv"), index=False)
            config, _ = run_job(
                os.path.join(folder, "sample", "warm.csv"),
                os.path.join(folder, "warm"),
                overrides,
                concurrency=2,
            )
            loads = [os.getloadavg()[0]]
            # The bare transcode runs before and after the job: the machine's other load changes
            # by the minute, so the job is compared with the faster of the two (the harder floor).
            seconds, bare_first = run_bare(clips, config.align.size, config.write.crf, config.write.preset)
            loads.append(os.getloadavg()[0])
            _, one = run_job(clips, os.path.join(folder, "one"), overrides, concurrency=1)
            loads.append(os.getloadavg()[0])
            _, two = run_job(clips, os.path.join(folder, "two"), overrides, concurrency=2)
            loads.append(os.getloadavg()[0])
        finally:
            ray.shutdown()
        _, bare_last = run_bare(clips, config.align.size, config.write.crf, config.write.preset)
        loads.append(os.getloadavg()[0])
    bare_wall = min(bare_first, bare_last)
    job_rate, one_rate, bare_rate = (
        two.clip_seconds_in / two.wall_s,
        one.clip_seconds_in / one.wall_s,
        seconds / bare_wall,
    )
    total = sum(two.timings_s.values())
    options = [*([f"--repeat {repeat}"] if repeat > 1 else []), *(["--inputs real"] if inputs == "real" else [])]
    command = " ".join(["python -m benchmarks.bench_data", *overrides, *options])
    described = "real clip of `../shared/data/real`" if inputs == "real" else "clip of the embedded sample that yields samples"
    lines = [
        HEADING,
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs "
        f"(load average {loads[0]:.1f} before the timed runs), local Ray. "
        f"Command: `{command}`. Inputs: the {two.inputs} clips ({repeat} copies of each {described}) "
        f"({two.clip_seconds_in:.1f} clip-seconds, {two.written} samples), crops {config.align.size}x{config.align.size}, "
        f"x264 crf {config.write.crf} `{config.write.preset}`, faces `{config.faces.backend}` (detect every "
        f"{config.faces.stride} frames around the tracked face, the whole frame every {config.faces.check_every} "
        f"detections, faces >= {config.faces.min_face_size} px), IQA `{config.iqa.backend}`. One run each.",
        "",
        "| run (in this order) | wall s | clip-s / wall-s | machine load after (1-min avg) |",
        "|---|---:|---:|---:|",
        f"| bare decode + resize + encode, 2 processes | {bare_first:.1f} | {seconds / bare_first:.2f} | {loads[1]:.1f} |",
        f"| ingest job, 1 Ray worker | {one.wall_s:.1f} | {one_rate:.2f} | {loads[2]:.1f} |",
        f"| ingest job, 2 Ray workers | {two.wall_s:.1f} | {job_rate:.2f} | {loads[3]:.1f} |",
        f"| bare decode + resize + encode, 2 processes | {bare_last:.1f} | {seconds / bare_last:.2f} | {loads[4]:.1f} |",
        "",
        f"Ingest (2 workers) / bare transcode (the faster of its two runs): {job_rate / bare_rate:.2f}x the "
        f"throughput (the job also detects, tracks, aligns, scores and shards). Scaling 1 -> 2 workers: {one.wall_s / two.wall_s:.2f}x.",
        "",
        "| stage | worker s (2-worker run) | share |",
        "|---|---:|---:|",
        *[
            f"| {stage} | {value:.1f} | {100 * value / total:.0f}% |"
            for stage, value in two.timings_s.items()
        ],
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write", action="store_true", help="replace the Data section of benchmarks/RESULTS.md"
    )
    parser.add_argument("--repeat", type=int, default=1, help="copies of each clip in the input (amortises fixed costs)")
    parser.add_argument("--inputs", choices=["sample", "real"], default="sample", help="the embedded sample or ../shared/data/real")
    parser.add_argument("overrides", nargs="*", help="data-job overrides, e.g. align.size=256")
    args = parser.parse_args(argv)
    return report(measure(args.overrides, args.repeat, args.inputs), HEADING, args.write)


if __name__ == "__main__":
    main()
