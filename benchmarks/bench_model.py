"""Model benchmark at the tiny profile: streaming student vs 50-step CFG teacher, and streaming memory.

    python -m benchmarks.bench_model            # print the markdown section (and return it from main())
    python -m benchmarks.bench_model --write    # also replace the "## Model" section of benchmarks/RESULTS.md

1. Speed: seconds per generated frame on the same 81-frame clip (21 latent frames, 64x64 pixels):
   the teacher's 50-step Euler ODE with CFG 4.5 (cond + uncond batched) then a whole-clip TAE decode,
   vs the student's 2-step streaming sampler with a streaming TAE decode (9 + 6 x 12 frames).
2. Memory: 1-minute vs 6-minute streaming rollouts, each in a fresh process, conditions generated
   chunk by chunk (as a live stream would deliver them) and outputs dropped after each chunk; the
   kernel's resident-memory high-water mark (VmHWM, reset just before the rollout, so it is the true
   peak of the rollout, not a sample) and the exact KV-cache size. Decoding is skipped there.
Weights are random (tiny profile): these numbers are about compute and memory, never quality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator

import torch

from benchmarks.results import report
from lipforcing.data import FPS
from lipforcing.diffusion import sample_teacher
from lipforcing.inference import stream_generate
from lipforcing.models import (
    Condition,
    build_student,
    build_tae,
    build_teacher,
    model_config,
    random_condition,
    text_embeddings,
)

LATENT_HW = 8  # 64x64 pixels
COMMAND = "python -m benchmarks.bench_model --write"


def rss_bytes(field: str = "VmRSS") -> int:
    """Resident memory (VmRSS) or its high-water mark (VmHWM) from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    """Restart the kernel's high-water mark, so VmHWM then measures only what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def bench_speed(latent_frames: int = 21) -> dict[str, float]:
    cfg = model_config("tiny")
    teacher, student, tae = build_teacher(cfg).eval(), build_student(cfg).eval(), build_tae(cfg)
    cond = random_condition(cfg, 1, latent_frames, LATENT_HW, LATENT_HW, torch.Generator().manual_seed(0))
    null = cond.null(text_embeddings(cfg)[1])
    noise = torch.randn(1, 16, latent_frames, LATENT_HW, LATENT_HW)
    sample_teacher(teacher, noise, cond, null, num_steps=2)  # warm-up
    list(stream_generate(student, cond.frames(0, 3)))

    start = time.perf_counter()
    latents = sample_teacher(teacher, noise, cond, null, cfg.guidance_scale, cfg.teacher_steps).latents
    teacher_denoise = time.perf_counter() - start
    with torch.no_grad():
        teacher_frames = tae.decode(latents).shape[1]
    teacher_total = time.perf_counter() - start

    start, first, student_frames, student_denoise = time.perf_counter(), None, 0, 0.0
    for chunk in stream_generate(student, cond, decoder=tae.stream_decoder()):
        first = time.perf_counter() - start if first is None else first
        student_frames += chunk.frames.shape[1]
    student_total = time.perf_counter() - start
    start = time.perf_counter()
    list(stream_generate(student, cond))
    student_denoise = time.perf_counter() - start
    assert teacher_frames == student_frames == 4 * latent_frames - 3
    return {
        "frames": student_frames,
        "teacher_s_per_frame": teacher_total / teacher_frames,
        "student_s_per_frame": student_total / student_frames,
        "teacher_denoise_s_per_frame": teacher_denoise / teacher_frames,
        "student_denoise_s_per_frame": student_denoise / student_frames,
        "student_first_chunk_s": first,
    }


def dit_flops(cfg, query_tokens: int, key_tokens: int) -> float:
    """Matmul FLOPs of one DiT call (blocks only): linear layers + self- and cross-attention scores."""
    d, layers, text = cfg.dim, cfg.num_layers, cfg.text_len
    linear = 2 * query_tokens * (4 * d * d + 2 * d * d + 2 * d * cfg.ffn_dim)  # self qkvo, cross q/o, ffn
    cross_kv = 2 * text * 2 * d * d
    attention = 4 * query_tokens * (key_tokens + text) * d
    return layers * (linear + cross_kv + attention)


def flops_ratio(profile: str = "1.3b", latent_hw: int = 64, latent_frames: int = 21) -> float:
    """Teacher / student denoising FLOPs per frame at a real size (analytic, not measured)."""
    cfg = model_config(profile)
    frame = (latent_hw // 2) ** 2
    clip = latent_frames * frame
    teacher = cfg.teacher_steps * 2 * dit_flops(cfg, clip, clip)  # cond + uncond per step
    student = 0.0
    for start in range(0, latent_frames, cfg.chunk_frames):
        window = min(start, cfg.sink_frames + cfg.rolling_frames - cfg.chunk_frames) + cfg.chunk_frames
        calls = len(cfg.student_timesteps) + 1  # two denoising calls + the cache write
        student += calls * dit_flops(cfg, cfg.chunk_frames * frame, window * frame)
    return teacher / student


def live_conditions(cfg, chunks: int) -> Iterator[Condition]:
    """Per-chunk conditions made on the fly: memory never holds more than one chunk's inputs."""
    g = torch.Generator().manual_seed(0)
    text = text_embeddings(cfg)[0][None]
    for _ in range(chunks):
        cond = random_condition(cfg, 1, cfg.chunk_frames, LATENT_HW, LATENT_HW, g)
        cond.text = text
        yield cond


def rollout_memory(minutes: float) -> dict[str, float]:
    """One streaming rollout of `minutes` of video in this process (run it in a fresh process)."""
    cfg = model_config("tiny")
    student = build_student(cfg).eval()
    chunks = round(minutes * 60 * FPS / (4 * cfg.chunk_frames))
    list(stream_generate(student, live_conditions(cfg, 1)))  # warm-up: allocator and kernels
    cache = student.new_cache()
    cache_bytes, cache_frames = 0, 0
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    for chunk in stream_generate(student, live_conditions(cfg, chunks), cache=cache):
        cache_bytes, cache_frames = max(cache_bytes, cache.nbytes()), max(cache_frames, cache.num_frames)
        del chunk
    peak = rss_bytes("VmHWM")
    frames = 4 * chunks * cfg.chunk_frames - 3
    return {
        "minutes": minutes,
        "chunks": chunks,
        "frames": frames,
        "seconds": time.perf_counter() - start,
        "rss_before": before,
        "rss_peak": peak,
        "kv_cache_bytes": cache_bytes,
        "cache_frames": cache_frames,
    }


def bench_memory(minutes: tuple[float, ...] = (1.0, 6.0)) -> list[dict[str, float]]:
    runs = []
    for m in minutes:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(m)], check=True, capture_output=True, text=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def markdown(speed: dict[str, float], memory: list[dict[str, float]]) -> str:
    mib = 2**20
    short, long = memory
    lines = [
        "## Model",
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, torch "
        f"{torch.__version__}, 1 thread. Command: `{COMMAND}`. Tiny profile, random weights "
        "(compute and memory only, never quality).",
        "",
        f"### Speed: one {speed['frames']}-frame clip at 64x64 (21 latent frames), one run",
        "",
        "| sampler | s / frame | s / frame, denoising only |",
        "|---|---|---|",
        f"| teacher, 50 steps, CFG 4.5, TAE decode | {speed['teacher_s_per_frame']:.4f} | "
        f"{speed['teacher_denoise_s_per_frame']:.4f} |",
        f"| student, 2 steps per chunk, streaming TAE decode | {speed['student_s_per_frame']:.4f} | "
        f"{speed['student_denoise_s_per_frame']:.4f} |",
        f"| **speed-up** | **{speed['teacher_s_per_frame'] / speed['student_s_per_frame']:.1f}x** | "
        f"{speed['teacher_denoise_s_per_frame'] / speed['student_denoise_s_per_frame']:.1f}x |",
        "",
        f"Student first chunk (9 frames, decoded): {speed['student_first_chunk_s'] * 1000:.0f} ms. "
        "The paper's same-scale speed-up is 17.6x at 1.3B on an H100; the tiny profile on a CPU is "
        "dominated by per-call overhead, so its ratio is not a prediction of that number. For scale: "
        f"at 1.3B and 512x512 the teacher spends {flops_ratio('1.3b'):.0f}x the student's DiT matmul "
        "FLOPs per frame (analytic count, not a measurement; it ignores the VAE/TAE and every overhead).",
        "",
        "### Memory: streaming rollout length (fresh process each, no decoding, inputs made per chunk)",
        "",
        "Peak = the kernel's VmHWM reset right before the rollout (a true peak, not a sample); the whole "
        "process (Python, torch, model) is counted.",
        "",
        "| rollout | chunks | frames | wall s | RSS before MiB | peak RSS during rollout MiB | largest KV cache |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in memory:
        lines.append(
            f"| {run['minutes']:g} min | {run['chunks']} | {run['frames']} | {run['seconds']:.1f} | "
            f"{run['rss_before'] / mib:.1f} | {run['rss_peak'] / mib:.1f} | "
            f"{run['cache_frames']} frames, {run['kv_cache_bytes'] / 1024:.0f} KiB |"
        )
    ratio = long["rss_peak"] / short["rss_peak"]
    growth = (long["rss_peak"] - long["rss_before"]) / mib, (short["rss_peak"] - short["rss_before"]) / mib
    lines += [
        "",
        f"Peak RSS 6 min / 1 min: {ratio:.4f} ({'within' if abs(ratio - 1) <= 0.02 else 'NOT within'} 2%); "
        f"growth over the rollout: {growth[1]:.1f} MiB (1 min) vs {growth[0]:.1f} MiB (6 min).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update the ## Model section of RESULTS.md")
    parser.add_argument("--memory-child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.memory_child is not None:
        print(json.dumps(rollout_memory(args.memory_child)))
        return ""
    return report(markdown(bench_speed(), bench_memory()), "## Model", args.write)


if __name__ == "__main__":
    main()
