"""Speed end to end at the `bench` profile: the teacher's 50-step CFG sampler vs the streaming student.

    python -m benchmarks.bench_speed            # print the markdown section
    python -m benchmarks.bench_speed --write    # also replace "## Speed" in benchmarks/RESULTS.md

One 81-frame clip at 128x128 (21 latent frames of 16x16) and one set of encoders and decoders serve both
samplers, in one process, taking turns, so every ratio is between numbers measured side by side:
- condition encode (wav2vec2 features; Wan VAE encodes of the reference frame, the mouth-masked clip
  and the reference sequence of the 65-channel models): the teacher's at once (`LatentEncoder.condition`),
  the student's chunk by chunk as `make infer` and `make eval` run it (`ConditionStream`);
- teacher: 50-step Euler ODE with CFG 4.5 (cond + uncond in one batched call), then a whole-clip decode;
- student: per 3-latent chunk its condition encode, 2 denoising calls + 1 cache write, and its decode.
TTFF as the paper defines it: from the first VAE encode (the reference frame, then the first chunk's
9 frames) to the end of that chunk's last decode. FPS: the streaming loop's steady state (frames after
the first chunk over their time, each chunk's encode included). Random weights: speed only, never quality.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from benchmarks.results import machine, report
from lipforcing.data import FPS, SAMPLE_RATE
from lipforcing.data.encode import LatentEncoder
from lipforcing.data.windows import WindowConfig
from lipforcing.diffusion import sample_teacher
from lipforcing.inference import stream_generate
from lipforcing.inference.conditions import ConditionStream, chunk_frame_counts
from lipforcing.inference.streaming import StreamDecoder, streaming_fps
from lipforcing.models import Condition, build_student, build_tae, build_teacher, model_config
from lipforcing.models.causal import CausalWanModel
from lipforcing.models.config import ModelConfig

HEADING = "## Speed"
COMMAND = "python -m benchmarks.bench_speed --write"
TARGETS = {"TAE": 30.0, "Wan VAE": 20.0}  # issue 15: end-to-end speed-up wanted at the bench profile


class Timeline:
    """Named instants on one clock; `sync` runs before each mark (a CUDA synchronize on a GPU), so a mark
    is when the work queued before it has finished, not when it was queued."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] = lambda: None):
        self.clock, self.sync = clock, sync
        self.events: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        self.sync()
        self.events.append((name, self.clock()))

    def first(self, name: str) -> float:
        return next(t for n, t in self.events if n == name)

    def all(self, name: str) -> list[float]:
        return [t for n, t in self.events if n == name]


class TimedDecoder:
    """A stream decoder that marks the end of every chunk's decode and sums its seconds."""

    def __init__(self, decoder: StreamDecoder, timeline: Timeline):
        self.decoder, self.timeline, self.seconds = decoder, timeline, 0.0

    def reset(self) -> None:
        self.decoder.reset()

    def decode(self, latents: Tensor) -> Tensor:
        self.timeline.mark("decode_start")
        frames = self.decoder.decode(latents)
        self.timeline.mark("decode_end")
        self.seconds += self.timeline.all("decode_end")[-1] - self.timeline.all("decode_start")[-1]
        return frames


def mark_vae_encodes(encoder: LatentEncoder, timeline: Timeline) -> torch.utils.hooks.RemovableHandle:
    """Mark "vae_encode" whenever the Wan VAE's encoder network starts (the paper's TTFF start)."""
    return encoder.vae.vae.encoder.register_forward_pre_hook(lambda module, args: timeline.mark("vae_encode"))


def streamed_conditions(encoder: LatentEncoder, batch: dict, timeline: Timeline, seconds: list[float]) -> Iterator[Condition]:
    """The clip's conditions chunk by chunk, encoded as `make infer` and `make eval` encode them, each
    when the loop asks for it; appends every encode's seconds (the stream's setup first) to `seconds`."""
    video = batch["video"]
    conditions, setup_s = timed(lambda: ConditionStream(encoder, batch["reference"], batch["audio"], video.shape[1]), timeline)
    seconds.append(setup_s)
    for frames in video.split(chunk_frame_counts(video.shape[1], encoder.model.chunk_frames), dim=1):
        cond, encode_s = timed(partial(conditions.next, frames), timeline)
        seconds.append(encode_s)
        yield cond


def ttff(encoder: LatentEncoder, student: CausalWanModel, decoder: StreamDecoder, batch: dict, timeline: Timeline) -> float:
    """One first-chunk pass: encode the reference and the first chunk's inputs, generate the chunk, decode it.

    Returns TTFF in seconds as the paper defines it: the first VAE encode (the reference frame) to the
    end of the chunk's last decode. The first wav2vec2 window is computed inside it, when the first
    chunk asks for its audio, as in `make eval` and `make infer`.
    """
    timeline.events.clear()
    handle = mark_vae_encodes(encoder, timeline)
    try:
        conditions = streamed_conditions(encoder, batch, timeline, [])
        stream = stream_generate(student, conditions, TimedDecoder(decoder, timeline), generator=torch.Generator(encoder.device).manual_seed(0))
        next(stream)
        stream.close()
    finally:
        handle.remove()
    return timeline.first("decode_end") - timeline.first("vae_encode")


@dataclass
class Parts:
    """Seconds of one clip's generation, by part."""

    encode: float
    denoise: float
    decode: float
    frames: int
    chunk_ends: list[float] = field(default_factory=list)  # student: seconds from loop start to each chunk's end
    chunk_frames: list[int] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.encode + self.denoise + self.decode

    def shares(self) -> tuple[float, float, float]:
        return self.encode / self.total, self.denoise / self.total, self.decode / self.total

    @property
    def loop_fps(self) -> float:
        """Steady-state frames per second of the streaming loop (every chunk after the first), as eval counts it."""
        return streaming_fps(self.chunk_frames, self.chunk_ends)


def timed(fn: Callable[[], object], timeline: Timeline) -> tuple[object, float]:
    timeline.mark("start")
    out = fn()
    timeline.mark("end")
    return out, timeline.all("end")[-1] - timeline.all("start")[-1]


def teacher_latents(teacher: nn.Module, cond: Condition, negative_text: Tensor, steps: int | None = None) -> Tensor:
    """The teacher's sampler on the whole clip: Euler ODE with CFG (cond + uncond batched per step)."""
    cfg = teacher.cfg
    noise = torch.randn(cond.masked_video.shape, generator=torch.Generator().manual_seed(0)).to(cond.masked_video.device)
    steps = cfg.teacher_steps if steps is None else steps
    return sample_teacher(teacher, noise, cond, cond.null(negative_text), cfg.guidance_scale, steps, cfg.shift).latents


def run_student(encoder: LatentEncoder, student: CausalWanModel, decoder: StreamDecoder, batch: dict, timeline: Timeline) -> Parts:
    """The streaming loop from the source clip: each chunk's condition encoded, the chunk denoised,
    cached and decoded as it arrives."""
    decoding, encodes = TimedDecoder(decoder, timeline), []
    ends, counts = [], []
    timeline.mark("loop_start")
    start = timeline.all("loop_start")[-1]
    conditions = streamed_conditions(encoder, batch, timeline, encodes)
    for chunk in stream_generate(student, conditions, decoding, generator=torch.Generator(encoder.device).manual_seed(0)):
        timeline.mark("chunk_end")
        ends.append(timeline.all("chunk_end")[-1] - start)
        counts.append(chunk.frames.shape[1])
    encode = sum(encodes)
    return Parts(encode, ends[-1] - encode - decoding.seconds, decoding.seconds, sum(counts), ends, counts)


def call_seconds(student: CausalWanModel, cond: Condition, clock: Callable[[], float] = time.perf_counter, repeats: int = 5) -> float:
    """Median seconds of one steady-state student call (a full cache window, no write)."""
    cache = student.new_cache()
    with torch.no_grad():
        for chunk in stream_generate(student, cond, cache=cache, generator=torch.Generator().manual_seed(0)):
            last = chunk
        n = last.latents.shape[2]
        chunk_cond = cond.frames(cond.masked_video.shape[2] - n, cond.masked_video.shape[2])
        t = torch.full((1,), student.cfg.student_timesteps[0])
        seconds = []
        for _ in range(repeats + 1):  # the first call is a warm-up
            start = clock()
            student.forward_chunk(last.latents, t, chunk_cond, cache)
            seconds.append(clock() - start)
    return statistics.median(seconds[1:])


def minimal_width(cfg: ModelConfig) -> ModelConfig:
    """The same layers, tokens and head width at the smallest width: roughly what a call costs besides
    its compute (an upper bound on the per-call overhead: one head's attention and tiny matmuls remain)."""
    return model_config(cfg.profile, dim=cfg.head_dim, num_heads=1, ffn_dim=cfg.head_dim)


def clip_batch(frames: int, size: int, with_sequence: bool) -> dict[str, Tensor | None]:
    """A random clip's encoder inputs: video [1, T, 3, S, S] in [0, 1] and its 16 kHz audio."""
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, frames, 3, size, size, generator=g)
    audio = torch.randn(1, frames * SAMPLE_RATE // FPS, generator=g) * 0.1
    return {"video": video, "reference": video[:, :1], "reference_sequence": video if with_sequence else None, "audio": audio}


@dataclass
class SpeedResult:
    profile: str
    frames: int
    size: int
    teacher: dict[str, Parts]  # by decoder name
    student: dict[str, Parts]
    ttff: dict[str, float]  # seconds, by decoder name
    shape: str  # the profile's DiT in words
    call_s: float  # one steady-state student call at the profile
    minimal_call_s: float  # the same call at minimal width
    repeats: int
    machine: str = ""
    clock: str = ""


def bench(profile: str = "bench", frames: int = 81, size: int = 128, repeats: int = 3, clock: Callable[[], float] = time.process_time) -> SpeedResult:
    """Every number of the section, measured in this process. The teacher samples once (50 steps: long
    enough to average the machine's noise); every shorter part is the median of `repeats` runs.

    The clock defaults to this process's CPU seconds: on cores shared with other jobs, wall time also
    measures their load, which changes over a run, so the teacher's minutes and the student's seconds
    would see different machines. With one torch thread CPU seconds are wall seconds on an idle machine.
    """
    cfg = model_config(profile)
    started = time.perf_counter()
    timeline = Timeline(clock)
    encoder = LatentEncoder(cfg, WindowConfig(frames=frames, size=size))
    teacher, student, tae = build_teacher(cfg).eval(), build_student(cfg).eval(), build_tae(cfg)
    decoders = {"TAE": (tae.decode, tae.stream_decoder), "Wan VAE": (encoder.vae.decode, encoder.vae.stream_decoder)}
    batch = clip_batch(frames, size, cfg.use_reference_sequence)

    # warm-up: allocator, kernels and every module's first call stay out of the timings
    short = encoder.condition(clip_batch(4 * cfg.chunk_frames - 3, size, cfg.use_reference_sequence))
    teacher_latents(teacher, short, encoder.negative_text, steps=1)
    for _, stream in decoders.values():
        ttff(encoder, student, stream(), batch, timeline)

    encodes = [timed(lambda: encoder.condition(batch), timeline) for _ in range(repeats)]  # the teacher's, at once
    cond, encode_s = encodes[0][0], statistics.median(seconds for _, seconds in encodes)
    latents, denoise = timed(lambda: teacher_latents(teacher, cond, encoder.negative_text), timeline)
    teacher_parts, student_parts, first_frames = {}, {}, {}
    for name, (decode, stream) in decoders.items():
        with torch.no_grad():
            decodes = [timed(partial(decode, latents), timeline)[1] for _ in range(repeats)]
        teacher_parts[name] = Parts(encode_s, denoise, statistics.median(decodes), frames)
        student_parts[name] = median_parts([run_student(encoder, student, stream(), batch, timeline) for _ in range(repeats)])
        first_frames[name] = statistics.median(ttff(encoder, student, stream(), batch, timeline) for _ in range(repeats))
    call = call_seconds(student, cond, clock)
    minimal = call_seconds(build_student(minimal_width(cfg)).eval(), cond, clock)
    shape = f"dim {cfg.dim} = {cfg.num_heads} heads of {cfg.head_dim}, ffn {cfg.ffn_dim}, {cfg.num_layers} layers, {cfg.in_channels} input channels"
    clock_name = "CPU seconds of the process (time.process_time)" if clock is time.process_time else "wall seconds"
    return SpeedResult(
        profile, frames, size, teacher_parts, student_parts, first_frames, shape, call, minimal, repeats,
        machine(torch.get_num_threads()), f"{clock_name}; the whole run took {time.perf_counter() - started:.0f} wall seconds",
    )


def median_parts(runs: list[Parts]) -> Parts:
    """The run of median total (its parts and chunk times stay consistent with each other)."""
    return sorted(runs, key=lambda p: p.total)[len(runs) // 2]


def part_cell(seconds: float, share: float) -> str:
    return f"{seconds:.2f} ({100 * share:.1f}%)"


def markdown(result: SpeedResult, command: str = COMMAND) -> str:
    r = result
    latent = r.size // 8
    lines = [
        HEADING,
        "",
        f"Machine: {r.machine}. Command: `{command}`. Profile `{r.profile}` ({r.shape}; lipforcing/models/config.py "
        "says why its decoders are as wide as they are), "
        "random weights: speed only, never quality. One run, the samplers taking turns on the same clip, "
        f"encoders and decoders; the teacher samples once, every other part is the median of {r.repeats} runs. "
        f"Clock: {r.clock}.",
        "",
        f"### End to end: one {r.frames}-frame clip at {r.size}x{r.size} ({(r.frames - 1) // 4 + 1} latent frames of {latent}x{latent})",
        "",
        "Seconds per part (share of that row's total). Condition encode = wav2vec2 features + Wan VAE encodes "
        "(reference frame, mouth-masked clip, reference sequence): the teacher's of the whole clip at once, the "
        "student's chunk by chunk inside its loop as `make infer` runs it (`ConditionStream`; the same conditions, "
        "tests/test_conditions.py).",
        "",
        "| sampler | decoder | condition encode | denoise | decode | total s | frames / s | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in r.teacher:
        teacher, student = r.teacher[name], r.student[name]
        for label, parts in (("teacher, 50 steps, CFG 4.5, whole-clip decode", teacher), ("student, 2 steps + cache write per chunk, streaming decode", student)):
            e, d, c = parts.shares()
            speedup = teacher.total / parts.total
            cell = f"**{speedup:.1f}x**" if parts is student else "1x"
            lines.append(
                f"| {label} | {name} | {part_cell(parts.encode, e)} | {part_cell(parts.denoise, d)} | "
                f"{part_cell(parts.decode, c)} | {parts.total:.2f} | {parts.frames / parts.total:.2f} | {cell} |"
            )
    denoise = [r.teacher[n].denoise / r.student[n].denoise for n in r.teacher]
    lines += [
        "",
        f"Denoising alone: teacher / student {min(denoise):.1f}x-{max(denoise):.1f}x (the student's denoise is its "
        "streaming loop less its encodes and decodes, measured once per decoder). The student's encode and decode bound the "
        "end-to-end ratio: with a free denoiser it would be at most "
        + ", ".join(f"{r.teacher[n].total / (r.student[n].encode + r.student[n].decode):.0f}x ({n})" for n in r.teacher)
        + " (teacher total / student encode + decode). Without the condition encode (denoise + decode only, the "
        "clip encoded beforehand): "
        + ", ".join(f"{(r.teacher[n].denoise + r.teacher[n].decode) / (r.student[n].denoise + r.student[n].decode):.1f}x ({n})" for n in r.teacher)
        + ".",
        "",
        "### Streaming: first frames and loop rate",
        "",
        "TTFF as the paper defines it: the first VAE encode (the reference frame) to the end of the first chunk's "
        "last decode; the first wav2vec2 window, the chunk's encodes and its two calls lie inside it. "
        "FPS: frames after the first chunk over their time, each chunk's condition encode included.",
        "",
        "| decoder | TTFF ms | streaming loop FPS |",
        "|---|---|---|",
    ]
    for name, first in r.ttff.items():
        lines.append(f"| {name} | {1000 * first:.0f} | {r.student[name].loop_fps:.1f} |")
    overhead = r.minimal_call_s / r.call_s
    lines += [
        "",
        f"Per-call overhead: one steady-state student call (3 latent frames against a full cache window) takes "
        f"{1000 * r.call_s:.0f} ms at the profile and {1000 * r.minimal_call_s:.0f} ms at minimal width (same layers, "
        "tokens and one head of the same width: an upper bound on what a call costs besides its compute), "
        f"i.e. **{100 * overhead:.1f}%** {'<' if overhead < 0.1 else '>='} 10%.",
        "",
    ]
    verdicts = []
    for name, target in TARGETS.items():
        got = r.teacher[name].total / r.student[name].total
        verdicts.append(f"{name} {got:.1f}x vs {target:.0f}x wanted: {'met' if got >= target else 'NOT met'}")
    lines += [
        f"Targets (issue 15): {'; '.join(verdicts)}.",
        "",
        "On a GPU: `python -m benchmarks.gpu_speed --profile 1.3b` (and `14b`): random weights in bf16 at 512x512, "
        "FPS, TTFF and peak memory for eager, flash-only SDPA, torch.compile and CUDA graphs per chunk shape, "
        "`--teacher` for the same-scale speed-up. It has not run on a GPU yet (none here; only its CPU dry run in "
        "tests/test_bench_speed.py): its section, `## GPU speed`, appears once it has.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"update the {HEADING} section of RESULTS.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds = wall seconds when idle)")
    parser.add_argument("--profile", default="bench")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = bench(args.profile, args.frames, args.size, args.repeats)
    return report(markdown(result), HEADING, args.write)


if __name__ == "__main__":
    main()
