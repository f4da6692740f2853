"""`make infer` memory against input length: a 1-minute and a 10-minute real talking head, each in a
fresh process, at the tiny profile (a random-init student: plumbing and memory, never lip-sync).

    python -m benchmarks.bench_infer                 # print the section
    python -m benchmarks.bench_infer --write         # also replace "## Inference memory" in RESULTS.md
    python -m benchmarks.bench_infer --minutes 1,3   # other lengths

The input is `vr_face3.mp4` (590x590) played forward and backward to the length, with
`vr_audio1.wav` repeated under it, so both passes, the tracker, the student and the paste-back
run over every frame. Peak = the process's resident-memory high-water mark (VmHWM) at the end:
models, decoders, encoder and all. Before the streaming rewrite the job held every source frame:
15,000 frames of 590x590 RGB are 15.7 GB for the 10-minute input, which is why it refused inputs
over two minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_model import rss_bytes
from benchmarks.real_clips import REAL
from benchmarks.results import machine, report

COMMAND = "python -m benchmarks.bench_infer --write"
HEADING = "## Inference memory"


def make_inputs(folder: Path, minutes: float) -> tuple[str, str]:
    """A video of `minutes` (the real clip forward, backward, ...) and speech as long, written to disk
    as they are made (frames one at a time)."""
    from data_jobs.media import encode_wav, read_audio, timeline_frames, write_mp4
    from lipforcing.data import FPS, SAMPLE_RATE
    from pipelines.infer import output_sources, read_timeline

    clip, speech = REAL / "vr_face3.mp4", REAL / "vr_audio1.wav"
    if not clip.exists():
        raise SystemExit(f"the real clips are not at {REAL}: this benchmark measures on them")
    frames = list(timeline_frames(str(clip), read_timeline(str(clip)).indices))  # 125 frames: 130 MB
    total = round(minutes * 60 * FPS)
    video = folder / f"talk-{minutes:g}min.mp4"
    with open(video, "wb") as handle:
        write_mp4(handle, (frames[s] for s in output_sources(len(frames), total)), FPS, crf=23)
    audio = read_audio(str(speech), SAMPLE_RATE)
    repeated = np.resize(audio, total * SAMPLE_RATE // FPS)
    wav = folder / f"speech-{minutes:g}min.wav"
    wav.write_bytes(encode_wav(repeated, SAMPLE_RATE))
    return str(video), str(wav)


def child(video: str, audio: str, student: str, output: str) -> dict[str, float]:
    """One `make infer` run in this process: its wall time, frames, student FPS and peak memory."""
    from data_jobs.media import probe_media
    from pipelines.infer import InferConfig, lipsync
    from pipelines.jobs import resolve_config

    config = resolve_config(InferConfig, ["profile=tiny", f"video={video}", f"audio={audio}", f"student_weights={student}", f"output={output}"])
    start = time.perf_counter()
    result = lipsync(config)
    wall = time.perf_counter() - start
    info = probe_media(output)
    return {
        "frames": float(len(result.sources)),
        "output_s": info.duration_s,
        "wall_s": wall,
        "student_fps": result.student_fps,
        "edited": float(result.faced[result.sources].mean()),
        "peak_mb": rss_bytes("VmHWM") / 2**20,
    }


def measure(minutes: list[float]) -> list[dict[str, float]]:
    import torch
    from safetensors.torch import save_file

    from lipforcing.models import build_student
    from lipforcing.models.config import model_config

    runs = []
    with tempfile.TemporaryDirectory(prefix="lipforcing-bench-infer-") as scratch:
        folder = Path(scratch)
        student = folder / "dit.safetensors"
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in build_student(model_config("tiny")).state_dict().items()}, str(student))
        for length in minutes:
            video, audio = make_inputs(folder, length)
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_infer", "--child", video, audio, str(student), str(folder / "out.mp4")],
                check=True, capture_output=True, text=True,
                env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"},
            )  # fmt: skip
            runs.append({"minutes": length, **json.loads(out.stdout.strip().splitlines()[-1])})
            Path(video).unlink()
    return runs


def markdown(runs: list[dict[str, float]]) -> str:
    lines = [
        HEADING,
        "",
        f"Machine: {machine()}. Command: `{COMMAND}`. Tiny profile, random-init student (memory and "
        "plumbing, never quality). Input: `vr_face3.mp4` (590x590) played forward and backward to the "
        "length, `vr_audio1.wav` repeated under it; each length in a fresh process; peak = VmHWM at the "
        "end of the run (everything: models, both passes, the mp4 writer).",
        "",
        "| input | output frames | output duration | wall | student FPS | frames edited | peak resident memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['minutes']:g} min | {run['frames']:.0f} | {run['output_s']:.1f} s | {run['wall_s']:.0f} s | "
            f"{run['student_fps']:.1f} | {100 * run['edited']:.0f} % | {run['peak_mb']:.0f} MiB |"
        )
    if len(runs) > 1:
        short, long = runs[0], runs[-1]
        lines += [
            "",
            f"Peak memory of the {long['minutes']:g}-minute input / the {short['minutes']:g}-minute one: "
            f"{long['peak_mb'] / short['peak_mb']:.2f} for {long['frames'] / short['frames']:.1f}x the frames. "
            "Holding the source frames, as the job did before streaming, would need 590 x 590 x 3 bytes per "
            f"frame: {long['frames'] * 590 * 590 * 3 / 2**30:.1f} GiB for the longer input.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"update the {HEADING!r} section of RESULTS.md")
    parser.add_argument("--minutes", default="1,10", help="input lengths in minutes, comma-separated")
    parser.add_argument("--child", nargs=4, metavar=("VIDEO", "AUDIO", "STUDENT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = json.dumps(child(*args.child))
        print(result)
        return result
    runs = measure([float(m) for m in args.minutes.split(",")])
    return report(markdown(runs), HEADING, args.write)


if __name__ == "__main__":
    main()
