"""Streaming speed on a GPU at the 1.3b / 14b profiles: FPS, TTFF and peak memory, random weights in bf16.

    python -m benchmarks.gpu_speed --profile 1.3b                            # every variant, 512x512, Wan VAE
    python -m benchmarks.gpu_speed --profile 14b --variants eager,graphs --teacher --decoder tae
    python -m benchmarks.gpu_speed --profile 1.3b --frames 249 --write       # longer loop; "## GPU speed" in RESULTS.md
    python -m benchmarks.gpu_speed --profile tiny --device cpu --dtype float32 --size 64 --frames 17   # CPU dry run

Each variant runs in a fresh process (compile caches and memory peaks stay apart) on the same clip, and
with --teacher so does the eager 50-step CFG teacher (encode, sample, whole-clip decode):
  eager    PyTorch eager; SDPA picks its kernel
  flash    eager with SDPA restricted to FlashAttention (the streaming calls have no mask)
  compile  torch.compile of the DiT core (`run`, inductor's default mode) + flash
  graphs   torch.compile mode "reduce-overhead": one CUDA graph per chunk shape (the cache window grows
           from 0 to 3 to 4 frames, then stays), shapes specialised, + flash
Measured as in `bench_speed`: TTFF from the first VAE encode of the first chunk's 9 input frames to the end
of its last decode (CUDA-synchronised marks); FPS the steady state of the streaming loop; peak memory
`torch.cuda.max_memory_allocated` over the timed passes. Encoders and decoders run under bf16 autocast,
the DiT in bf16 weights; models are built on the meta device and initialised on the GPU (no 14B CPU init).
Not offered: folding a chunk's cache-write pass into the next chunk's first call. The folded pass would
give the clean chunk's keys two RoPE position sets (its own window's and the next chunk's), which
`CausalWanModel.forward_chunk` cannot express; faking it with a plain concatenation would change what the
student computes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
from collections.abc import Iterator

import torch
from torch import nn

from benchmarks.bench_speed import Timeline, clip_batch, run_student, teacher_latents, timed, ttff
from benchmarks.results import machine, report
from lipforcing.data.encode import LatentEncoder
from lipforcing.data.windows import WindowConfig
from lipforcing.models import build_student, build_tae, build_teacher, model_config
from lipforcing.models.causal import CausalWanModel
from lipforcing.models.config import ModelConfig

HEADING = "## GPU speed"
VARIANTS = {  # name -> (torch.compile mode or None, SDPA restricted to flash)
    "eager": (None, False),
    "flash": (None, True),
    "compile": ("default", True),
    "graphs": ("reduce-overhead", True),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="1.3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--size", type=int, default=512, help="frame side in pixels (512: 64x64 latents)")
    parser.add_argument("--frames", type=int, default=81, help="clip length, 4k + 1 (81: 7 chunks)")
    parser.add_argument("--decoder", default="vae", choices=("vae", "tae"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant (median)")
    parser.add_argument("--teacher", action="store_true", help="also the 50-step CFG teacher on the same clip (its own process)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="override the profile's 50 (dry runs only)")
    parser.add_argument("--write", action="store_true", help=f"replace the {HEADING} section of RESULTS.md")
    parser.add_argument("--child", choices=[*VARIANTS, "teacher"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; allowed: {', '.join(VARIANTS)}")
    return args


@contextlib.contextmanager
def attention_backend(flash: bool) -> Iterator[None]:
    if not flash:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        yield


def compile_student(student: CausalWanModel, mode: str) -> None:
    """Compile the DiT core every call goes through; with CUDA graphs, each call starts a new graph step
    (the cache copies the keys/values it keeps before the next call overwrites the graph's outputs)."""
    compiled = torch.compile(student.run, mode=mode, dynamic=False)

    def run(*args: object, **kwargs: object) -> object:
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    student.run = run


def setup(args: argparse.Namespace) -> tuple[ModelConfig, torch.device, torch.dtype, Timeline, LatentEncoder, nn.Module, dict]:
    """What both kinds of run share: the profile, a synchronising timeline, the encoder, the decoder, the clip."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = model_config(args.profile, **({} if args.teacher_steps is None else {"teacher_steps": args.teacher_steps}))
    timeline = Timeline(sync=lambda: torch.cuda.synchronize(device) if device.type == "cuda" else None)
    encoder = LatentEncoder(cfg, WindowConfig(frames=args.frames, size=args.size), device)
    decoder = encoder.vae if args.decoder == "vae" else build_tae(cfg).to(device)
    return cfg, device, dtype, timeline, encoder, decoder, clip_batch(args.frames, args.size, cfg.use_reference_sequence)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure(args: argparse.Namespace, variant: str) -> dict[str, float | str | None]:
    """One student variant in this process: a warm-up pass, then TTFF and the whole clip `repeats` times each."""
    cfg, device, dtype, timeline, encoder, decoder, batch = setup(args)
    student = build_student(cfg, device, dtype).eval()
    mode, flash = VARIANTS[variant]
    if mode is not None:
        compile_student(student, mode)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast, attention_backend(flash):
        run_student(encoder, student, decoder.stream_decoder(), batch, timeline)  # warm-up (and compilation)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        firsts = [ttff(encoder, student, decoder.stream_decoder(), batch, timeline) for _ in range(args.repeats)]
        runs = sorted((run_student(encoder, student, decoder.stream_decoder(), batch, timeline) for _ in range(args.repeats)), key=lambda p: p.total)
    run = runs[len(runs) // 2]
    return {
        "variant": variant,
        "ttff_ms": 1000 * statistics.median(firsts),
        "fps": run.loop_fps,
        "clip_s": run.total,
        "peak_gib": peak_gib(device),
    }


def measure_teacher(args: argparse.Namespace) -> dict[str, float | str | None]:
    """The 50-step CFG teacher on the same clip, eager, in its own process: encode, sample, whole-clip decode."""
    cfg, device, dtype, timeline, encoder, decoder, batch = setup(args)
    teacher = build_teacher(cfg, device, dtype).eval()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        teacher_latents(teacher, encoder.condition(batch), encoder.negative_text, steps=1)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cond, encode_s = timed(lambda: encoder.condition(batch), timeline)
        latents, denoise_s = timed(lambda: teacher_latents(teacher, cond, encoder.negative_text), timeline)
        _, decode_s = timed(lambda: decoder.decode(latents), timeline)
    return {"variant": "teacher", "clip_s": encode_s + denoise_s + decode_s, "peak_gib": peak_gib(device)}


def markdown(args: argparse.Namespace, rows: list[dict[str, float | str | None]], where: str, command: str) -> str:
    """One row per student variant; with a teacher row, each variant's end-to-end speed-up over it."""
    teacher = next((row for row in rows if row["variant"] == "teacher"), None)

    def cell(value: float | str | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        HEADING,
        "",
        f"Machine: {where}. Command: `{command}`. "
        f"Profile `{args.profile}`, random weights in {args.dtype}, {args.frames} frames at {args.size}x{args.size}, "
        f"{args.decoder.upper()} decoder; median of {args.repeats} passes per variant, each variant (and the teacher) "
        "in a fresh process. Clip s: condition encode + denoise + decode of the whole clip. Speed only, never quality. "
        "The paper: 31.58 FPS, TTFF 0.32 s at 1.3B; 15.11 FPS, 0.54 s at 14B; 17.6x / 39.8x over the teacher (one H100).",
        "",
        "| variant | TTFF ms | loop FPS | clip s | peak GiB | speed-up over the teacher |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row is teacher:
            continue
        speedup = None if teacher is None else f"{teacher['clip_s'] / row['clip_s']:.1f}x"
        lines.append(
            f"| {row['variant']} | {row['ttff_ms']:.0f} | {row['fps']:.2f} | {row['clip_s']:.2f} | "
            f"{cell(row['peak_gib'], '.1f')} | {cell(speedup, 's')} |"
        )
    if teacher is not None:
        lines.append(f"| teacher, 50 steps, CFG, eager | - | - | {teacher['clip_s']:.2f} | {cell(teacher['peak_gib'], '.1f')} | 1x |")
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.child is not None:
        torch.manual_seed(0)
        row = measure_teacher(args) if args.child == "teacher" else measure(args, args.child)
        print(json.dumps(row), flush=True)
        return ""
    rows = []
    forwarded = [a for a in argv if a != "--write"]
    for child in [*args.variants.split(","), *(["teacher"] if args.teacher else [])]:
        out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_speed", *forwarded, "--child", child], check=True, stdout=subprocess.PIPE, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else machine(torch.get_num_threads())
    command = " ".join(["python -m benchmarks.gpu_speed", *argv])
    return report(markdown(args, rows, where, command), HEADING, args.write)


if __name__ == "__main__":
    main()
