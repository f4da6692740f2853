"""Sync-metric benchmark: video seconds scored per second by the batched metric vs a per-shift loop.

    python -m benchmarks.bench_sync            # print the markdown section
    python -m benchmarks.bench_sync --write    # also replace the "## Sync metric" section of RESULTS.md

1. Metric only: `av_sync` (all 31 shifts in one tensor expression) and `sync_confidence_batch` (many
   clips in one call) against a straightforward loop over shifts and frames written here, on random
   per-frame embeddings of 10 s clips at 25 fps, 1024-d (syncnet_v2) and 256-d (our StableSyncNet).
   Before any timing both give the same offset, Sync-C and Sync-D (within 1e-4), so the ratio
   compares two implementations of one definition.
2. End to end: `score_clip` with a random tiny StableSyncNet on 10 s of random 128-px frames and
   random audio, split into embedding (windows + both encoders) and metric.
Random embeddings and weights: these numbers are about speed, never about sync quality.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.results import machine, report
from lipforcing.data import FPS, SAMPLE_RATE
from lipforcing.metrics.sync import av_sync, sync_confidence_batch
from lipforcing.models.syncnet import StableSyncNet, SyncNetConfig, clip_embeddings, score_clip

VSHIFT = 15
HEADING = "## Sync metric"
COMMAND = "python -m benchmarks.bench_sync --write"


def loop_sync(video_emb: torch.Tensor, audio_emb: torch.Tensor, vshift: int = VSHIFT) -> tuple[int, float, float]:
    """(offset, Sync-C, Sync-D) the plain way: for every shift, for every frame, one L2 distance."""
    frames, dim = video_emb.shape
    zeros = torch.zeros(vshift, dim, dtype=audio_emb.dtype)
    padded = torch.cat([zeros, audio_emb, zeros])
    mean_dists = []
    for shift in range(2 * vshift + 1):
        total = 0.0
        for t in range(frames):
            total += float(torch.linalg.vector_norm(video_emb[t] - padded[t + shift]))
        mean_dists.append(total / frames)
    best = min(range(len(mean_dists)), key=mean_dists.__getitem__)
    return vshift - best, statistics.median(mean_dists) - mean_dists[best], mean_dists[best]


def random_embeddings(clips: int, frames: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm video and audio embeddings [clips, frames, dim], audio a noisy copy delayed 2 frames."""
    g = torch.Generator().manual_seed(seed)
    video = torch.nn.functional.normalize(torch.randn(clips, frames, dim, generator=g), dim=-1)
    audio = torch.roll(video, 2, dims=1) + 0.5 * torch.randn(clips, frames, dim, generator=g)
    return video, torch.nn.functional.normalize(audio, dim=-1)


def check_equal(video: torch.Tensor, audio: torch.Tensor, tol: float = 1e-4) -> None:
    """Raise unless the batched metric and the loop agree on every clip (offset exactly, Sync-C/D to tol)."""
    batch_conf = sync_confidence_batch(video, audio, VSHIFT)
    for clip in range(video.shape[0]):
        fast = av_sync(video[clip], audio[clip], VSHIFT)
        offset, conf, dist = loop_sync(video[clip], audio[clip], VSHIFT)
        if fast.offset != offset or abs(fast.confidence - conf) > tol or abs(fast.min_dist - dist) > tol:
            got = f"{fast.offset}/{fast.confidence}/{fast.min_dist}"
            raise AssertionError(f"clip {clip}: av_sync {got} != loop {offset}/{conf}/{dist}")
        if abs(float(batch_conf[clip]) - conf) > tol:
            raise AssertionError(f"clip {clip}: sync_confidence_batch {float(batch_conf[clip])} != loop {conf}")


def interleaved_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time per function, the functions taking turns, so that load from other jobs on
    the shared machine falls on all of them alike; one warm-up call each first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def metric_row(video: torch.Tensor, audio: torch.Tensor, seconds: float) -> dict[str, float]:
    """Video-seconds per second of the loop and `av_sync` on clip 0, and of the batch on all clips."""
    check_equal(video[:2], audio[:2])
    seconds_per_call = interleaved_seconds(
        {
            "loop": lambda: loop_sync(video[0], audio[0]),
            "av_sync": lambda: av_sync(video[0], audio[0]),
            "batch": lambda: sync_confidence_batch(video, audio),
        },
        repeats=5,
    )
    batch, frames, dim = video.shape
    return {
        "dim": dim,
        "frames": frames,
        "batch": batch,
        "loop": seconds / seconds_per_call["loop"],
        "av_sync": seconds / seconds_per_call["av_sync"],
        "batch_vs": batch * seconds / seconds_per_call["batch"],
    }


def bench_metric(seconds: float = 10.0, dims: tuple[int, ...] = (1024, 256), batch: int = 8) -> list[dict[str, float]]:
    """One row per embedding size: 1024-d as syncnet_v2, 256-d as our StableSyncNet."""
    frames = round(seconds * FPS)
    return [metric_row(*random_embeddings(batch, frames, dim, seed=dim), seconds) for dim in dims]


def bench_score_clip(seconds: float = 10.0, size: int = 128) -> dict[str, float]:
    """End-to-end `score_clip` on one random clip with a random tiny StableSyncNet, and its split."""
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (round(seconds * FPS), size, size, 3), dtype=torch.uint8, generator=g)
    audio = np.random.default_rng(0).standard_normal(round(seconds * SAMPLE_RATE)).astype(np.float32) * 0.1
    model = StableSyncNet(SyncNetConfig()).eval()
    video_emb, audio_emb = clip_embeddings(model, frames, audio)
    seconds_per_call = interleaved_seconds(
        {
            "total": lambda: score_clip(model, frames, audio),
            "embed": lambda: clip_embeddings(model, frames, audio),
            "metric": lambda: av_sync(video_emb, audio_emb),
        },
        repeats=5,
    )
    return {"seconds": seconds, "windows": len(video_emb), **seconds_per_call}


def markdown(metric: list[dict[str, float]], clip: dict[str, float], threads: int) -> str:
    lines = [
        HEADING,
        "",
        f"Machine: {machine(threads)}. Command: `{COMMAND}`. One run; every ratio is between numbers "
        "measured side by side in that run (median of 5 repeats, the variants taking turns). Random embeddings / random weights: "
        "speed only, never sync quality.",
        "",
        f"### Metric only: video seconds scored per second ({metric[0]['frames'] / FPS:g} s clips, "
        f"{metric[0]['frames']} frames, {2 * VSHIFT + 1} shifts)",
        "",
        "Loop = a per-shift, per-frame Python loop of the same definitions, checked equal (offset exact, "
        "Sync-C and Sync-D within 1e-4) before timing.",
        "",
        "| embedding | loop, 1 clip | `av_sync`, 1 clip | `sync_confidence_batch`, "
        f"{metric[0]['batch']} clips | av_sync / loop | batch / loop |",
        "|---|---|---|---|---|---|",
    ]
    for row in metric:
        lines.append(
            f"| {row['dim']}-d | {row['loop']:.1f} | {row['av_sync']:.0f} | {row['batch_vs']:.0f} | "
            f"{row['av_sync'] / row['loop']:.0f}x | {row['batch_vs'] / row['loop']:.0f}x |"
        )
    mib = 2**20
    biggest = max(metric, key=lambda row: row["dim"])
    temp = biggest["batch"] * biggest["frames"] * biggest["dim"] * 4 / mib
    lines += [
        "",
        "`shift_distances` computes one shift at a time over all frames and clips, so its largest "
        f"intermediate is one [clips, frames, dim] difference: {temp:.0f} MiB for the {biggest['batch']}-clip "
        f"{biggest['dim']}-d batch (analytic size), {2 * VSHIFT + 1}x less than materialising every shift at once.",
    ]
    rate = clip["seconds"] / clip["total"]
    lines += [
        "",
        f"### End to end: `score_clip`, random tiny StableSyncNet (64 px), one {clip['seconds']:g} s clip of "
        "128-px uint8 frames + 16 kHz audio",
        "",
        "| part | s per clip | share of total |",
        "|---|---|---|",
        f"| embedding (windows + both encoders, {clip['windows']} windows) | {clip['embed']:.3f} | "
        f"{clip['embed'] / clip['total']:.0%} |",
        f"| metric (`av_sync`) | {clip['metric']:.4f} | {clip['metric'] / clip['total']:.1%} |",
        f"| **total** | **{clip['total']:.3f}** | {rate:.1f} video-s per s |",
        "",
        "Shares are of the measured total; embedding + metric need not sum to it exactly (separate timings).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the {HEADING!r} section of RESULTS.md")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: the 2 cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return report(markdown(bench_metric(), bench_score_clip(), args.threads), HEADING, args.write)


if __name__ == "__main__":
    main()
