"""Long-form eval: the student over whole videos, minutes long, scored segment by segment for drift.

A causal student runs far past the rollouts it was trained on (the paper tests 6-minute videos), so
its errors may build up. Each `long_form` video goes through `make infer`'s two passes with its own
audio (the face tracked shot by shot, the condition streamed: memory stays flat), and each
`long_form_segment_s` of output is scored: the generated crops against their source crops (SSIM,
PSNR, mouth PSNR) and against the audio (Sync-C / Sync-D, with a SyncNet), over the frames the
student edited (a stretch with no face passes through and is not scored). A short last piece (under
half a segment) joins the segment before it. Drift = the last scored segment's value minus the first's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data_jobs.media import to_uint8
from lipforcing import storage
from lipforcing.data import FPS
from pipelines.evaluate.clips import EvalClip
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.runner import Evaluator
from pipelines.infer import SAMPLES_PER_FRAME, InferConfig, TimelineReader, generated_chunks, prepare

DRIFTING = ("ssim", "mouth_psnr", "sync_c", "sync_d")  # the drift row's metrics


def segment_bounds(frames: int, segment: int) -> list[tuple[int, int]]:
    """[start, stop) output frames of each segment; a last piece under half a segment joins the one before."""
    starts = list(range(0, frames, segment))
    if len(starts) > 1 and frames - starts[-1] < segment / 2:
        starts.pop()
    return list(zip(starts, [*starts[1:], frames]))


def infer_settings(config: EvalConfig, video: str) -> InferConfig:
    """`make infer`'s settings for one long-form video: the eval's model, decoder, seed and face keys."""
    return InferConfig(profile=config.profile, video=video, decoder=config.decoder, seed=config.seed, window=config.window,
                       model=config.model, shot_threshold=config.shot_threshold, faces=config.faces, align=config.align)  # fmt: skip


def long_form_rows(config: EvalConfig, evaluator: Evaluator, video: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The per-segment rows of one video and its drift row. Only frames the student edited count (a
    faceless stretch passes through unscored: `edited_frames`); fidelity is added up chunk by chunk,
    and only the segment's generated crops (uint8) and audio are held, for SyncNet."""
    settings = infer_settings(config, video)
    prepared = prepare(settings, evaluator)
    key, audio = storage.absolute(video), prepared.result.audio
    bounds = segment_bounds(len(prepared.result.sources), round(config.long_form_segment_s * FPS))
    rows: list[dict[str, Any]] = []
    sums: dict[str, float] = {}
    held: list[torch.Tensor] = []  # this segment's generated crops so far
    speech: list[np.ndarray] = []  # and the audio under them

    def close_segment() -> None:
        start, stop = bounds[len(rows)]
        edited = sum(len(frames) for frames in held)
        row = {"video": key, "segment": len(rows), "start_s": start / FPS, "end_s": stop / FPS, "edited_frames": edited}
        if edited:
            row.update({name: total / edited for name, total in sums.items()})
            if evaluator.syncnet is not None:
                row.update(evaluator.sync(torch.cat(held), np.concatenate(speech)))
        rows.append(row)
        sums.clear()
        held.clear()
        speech.clear()

    with prepared.stack as stack:
        reader = TimelineReader(prepared.video, prepared.timeline)
        stack.callback(reader.close)
        for chunk in generated_chunks(settings, prepared, reader):
            position = chunk.span.start
            while position < chunk.span.stop:
                while position >= bounds[len(rows)][1]:  # segments before this frame are complete
                    close_segment()
                end = min(bounds[len(rows)][1], chunk.span.stop)
                piece = slice(position - chunk.span.start, end - chunk.span.start)
                real, fake = chunk.source[piece], chunk.generated[piece]
                for name, value in evaluator.fidelity(EvalClip(key, real, torch.empty(0)), fake).items():
                    sums[name] = sums.get(name, 0.0) + value * len(fake)
                held.append(to_uint8(fake))
                speech.append(audio[position * SAMPLES_PER_FRAME : end * SAMPLES_PER_FRAME])
                position = end
    while len(rows) < len(bounds):
        close_segment()
    scored = [row for row in rows if row["edited_frames"]]
    drift = {"video": key, "segments": len(rows), "minutes": len(prepared.result.sources) / FPS / 60}
    if scored:
        drift.update({f"{name}_drift": scored[-1][name] - scored[0][name] for name in DRIFTING if name in scored[0]})
    return rows, drift


def mean_drift(drifts: list[dict[str, Any]]) -> dict[str, float]:
    """The drift of each metric averaged over the long-form videos (for the run's metrics)."""
    keys = dict.fromkeys(k for row in drifts for k in row if k.endswith("_drift"))
    return {f"long_form_{k}": float(np.mean([row[k] for row in drifts if k in row])) for k in keys}
