"""`make eval`: stream a trained student over held-out clips, score it, report, log to MLflow.

    python -m pipelines.evaluate data=s3://bucket/heldout student_weights=models:/lipforcing-student@candidate

Per clip: the longest 4k+1-frame prefix that has audio, resized to `window.size`, with the clip's
first frame as the reference. The condition (Wan VAE, wav2vec2, mouth mask) is encoded and the student
generates the clip chunk by chunk with the two-step schedule, and the stream decoder turns each chunk into
frames as it arrives. Generated frames are compared with the source crops they replace: SSIM, PSNR,
mouth-region PSNR and L1, Sync-C / Sync-D / AV offset (also of the source crops, the ground-truth
row), CSIM, FPS, TTFF and peak memory; with `full_frame` they are also pasted back into their source
frames, which are scored whole (SSIM, PSNR, FID / FVD, and CSIM of the face re-aligned from the output frame). `audio_from=other` drives each clip with another
identity's audio (cross-identity). `long_form=[...]` also streams whole videos, minutes long, and
scores each `long_form_segment_s` of them for drift (`long_form.py`). FID / FVD run only with local feature-network weights, CSIM only
with an InsightFace model pack (its ArcFace model).

Timing. The condition is encoded chunk by chunk as the stream runs (`lipforcing/inference/conditions.py`:
memory stays flat for any length). TTFF: a separate first-chunk pass per clip, from the first VAE
encode (the reference, the first chunk's 4n-3 frames; the first wav2vec2 window of audio, up to 10 s)
to the end of decoding its frames,
as in the paper (there the encoder and decoder are both the VAE; here the decoder is `decoder`).
FPS: frames per second of the streaming loop (encode + denoise + cache write + decode) over the
chunks after the first; `encode_s` is the encoding's share of the loop; `fps_end_to_end` is over the
whole loop.
Results go to `<output>/report.{json,md}`, `<output>/samples/*.mp4` (source | generated, with the
clip's audio) and an MLflow run `eval` tagged with the student's registered version.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import torch

from data_jobs.media import encode_mp4, to_uint8
from lipforcing import storage
from lipforcing.config import ConfigError, to_yaml
from lipforcing.data import FPS, SAMPLE_RATE
from pipelines.evaluate.clips import eval_clips, heldout_shards, with_other_audio
from pipelines.evaluate.config import EvalConfig, validate
from pipelines.evaluate.long_form import long_form_rows, mean_drift
from pipelines.evaluate.report import NOTES, mean_row, write_outputs
from pipelines.evaluate.runner import (
    Evaluator,
    FeatureSets,
    evaluate_clip,
    feature_networks,
    full_frame_metrics,
    full_frames,
)
from pipelines.ray_cluster import in_submitted_job, ray_node, run_on_worker
from pipelines.student_model import sampling_timesteps

log = logging.getLogger("lipforcing.eval")


def evaluate(config: EvalConfig) -> int:
    """The job. Submitted to a cluster it runs on a worker node (a GPU one when the cluster has
    GPUs), not on the head where the driver lands: FPS and TTFF are measured where a student runs."""
    validate(config)
    if in_submitted_job():
        return run_on_worker(evaluate_here, config)
    return evaluate_here(config)


def evaluate_here(config: EvalConfig) -> int:
    """Evaluate in this process; downloaded weights and staged outputs live in a scratch folder."""
    with tempfile.TemporaryDirectory(prefix="lipforcing-eval-") as scratch:
        return run_eval(config, scratch)


def run_eval(config: EvalConfig, scratch: str) -> int:
    import mlflow

    from pipelines import tracking

    shards = heldout_shards(config.data)  # before any model loads
    for video in config.long_form:
        storage.require(video, "long_form")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    folder = os.path.join(scratch, "report")
    os.makedirs(os.path.join(folder, "samples"))
    storage.write_text(storage.join(config.output, "config.yaml"), to_yaml(config))
    with tracking.start_run(
        "eval", config=config, tags={"job": "eval", "student": config.student_weights}
    ) as run:
        student_path, student_version = tracking.resolve_model(config.student_weights, scratch, "student_weights")
        syncnet_path, syncnet_version = (
            tracking.resolve_model(config.syncnet_weights, scratch, "syncnet_weights") if config.syncnet_weights else ("", "")
        )
        config.model.student_timesteps = sampling_timesteps(config.student_weights, config.model.student_timesteps)
        mlflow.set_tags(
            {
                "ray_node": ray_node(),
                "student_timesteps": str(config.model.student_timesteps),
                "student_version": student_version or "unregistered",
                "syncnet": config.syncnet_weights or "none",
                "syncnet_version": syncnet_version or "unregistered",
                "decoder": config.decoder,
            }
        )
        evaluator = Evaluator(config, student_path, syncnet_path, device)
        extractors, skipped_metrics = feature_networks(config, device)
        if not config.syncnet_weights:
            skipped_metrics["Sync-C / Sync-D"] = "config key 'syncnet_weights' is empty"
        if not config.csim_model_pack:
            skipped_metrics["CSIM"] = (
                "needs ArcFace identity embeddings: set csim_model_pack to an InsightFace model pack "
                "folder (buffalo_l, with w600k_r50.onnx), local or s3://"
            )
        features, full_features = FeatureSets(extractors, device), FeatureSets(extractors, device)
        rows: list[dict[str, Any]] = []
        skipped_clips: list[dict[str, str]] = []
        clips = eval_clips(shards, config, evaluator.first_chunk_frames, skipped_clips)
        if config.audio_from == "other":
            clips = with_other_audio(list(clips))
        for clip in clips:
            if not rows:
                evaluator.time_to_first_frames(clip)  # warm-up: one-time costs stay out of the first TTFF
            row, generated = evaluate_clip(evaluator, clip, device)
            if config.full_frame:
                pasted = full_frames(clip, generated, config.window.mask_box, faces=evaluator.identity is not None)
                if isinstance(pasted, str):
                    skipped_metrics[f"full-frame metrics of {clip.key}"] = pasted
                else:
                    row.update(full_frame_metrics(pasted, evaluator.identity))
                    full_features.add(pasted.real, pasted.fake)
            features.add(clip.video, generated)
            if len(rows) < config.samples:
                side_by_side = to_uint8(torch.cat([clip.video, generated], dim=-1)).numpy()
                with open(os.path.join(folder, "samples", f"{clip.key}.mp4"), "wb") as handle:
                    handle.write(encode_mp4(side_by_side, FPS, crf=18, audio=clip.audio.numpy(), sample_rate=SAMPLE_RATE))
            tracking.log_metrics({f"clip/{k}": v for k, v in row.items() if k != "key"}, step=len(rows))
            log.info("%s: %s", clip.key, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "key"))
            rows.append(row)
        if not rows:
            raise RuntimeError(f"no clip in {config.data!r} could be evaluated: {skipped_clips}")
        segments, drifts = [], []
        for index, video in enumerate(config.long_form):
            log.info("long-form %s: streaming it whole, scored every %g s", video, config.long_form_segment_s)
            try:
                video_rows, drift = long_form_rows(config, evaluator, video)
            except (ConfigError, OSError, ValueError) as err:  # one unreadable video costs its rows, not the report
                skipped_metrics[f"long-form {video}"] = str(err)
                continue
            for row in video_rows:
                tracking.log_metrics({f"long_form/{index}/{k}": v for k, v in row.items() if isinstance(v, float)}, step=row["segment"])
            segments += video_rows
            drifts.append(drift)
        set_metrics, too_few = features.distances()
        if config.full_frame:
            full_set, full_too_few = full_features.distances()
            set_metrics.update({f"full_{name}": value for name, value in full_set.items()})
            too_few.update({f"full-frame {name}": reason for name, reason in full_too_few.items()})
        report = {
            "profile": config.profile,
            "student": config.student_weights,
            "student_version": student_version,
            "syncnet": config.syncnet_weights,
            "decoder": config.decoder,
            "device": str(device),
            "size": config.window.size,
            "reference": "the first frame of each clip",
            "audio": "each clip's own" if config.audio_from == "own" else "the next clip's (cross-identity)",
            "random_init": [
                key
                for key in ("dit_weights", "vae_weights", "tae_weights", "audio_encoder_weights")
                if not getattr(config.model, key)
            ],
            "memory": "peak CUDA allocation per clip" if use_cuda else "process peak RSS so far (CPU)",
            "clips": rows,
            "mean": mean_row(rows),
            "set_metrics": set_metrics,
            "skipped_metrics": {**skipped_metrics, **too_few},
            "skipped_clips": skipped_clips,
            "long_form": {"segments": segments, "drift": drifts},
            "notes": list(NOTES),
            "mlflow_run_id": run.info.run_id,
        }
        tracking.log_metrics({**report["mean"], **set_metrics, **mean_drift(drifts)})
        write_outputs(report, folder, config.output)
    log.info("%d clips; report at %s", len(rows), storage.join(config.output, "report.md"))
    return 0
