"""The eval report: the per-clip table, the set metrics, how each number is measured; written and logged."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from lipforcing import storage
from pipelines.evaluate.config import TINY_WARNING

COLUMNS = (
    ("frames", "frames", "{:.0f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("full_ssim", "full-frame SSIM", "{:.4f}"),
    ("full_psnr", "full-frame PSNR dB", "{:.2f}"),
    ("psnr", "PSNR dB", "{:.2f}"),
    ("mouth_psnr", "mouth PSNR dB", "{:.2f}"),
    ("mouth_l1", "mouth L1", "{:.4f}"),
    ("csim", "CSIM", "{:.4f}"),
    ("full_csim", "full-frame CSIM", "{:.4f}"),
    ("sync_c", "Sync-C", "{:.2f}"),
    ("sync_d", "Sync-D", "{:.2f}"),
    ("av_offset", "offset", "{:+.1f}"),
    ("gt_sync_c", "GT Sync-C", "{:.2f}"),
    ("gt_sync_d", "GT Sync-D", "{:.2f}"),
    ("gt_av_offset", "GT offset", "{:+.1f}"),
    ("fps", "FPS", "{:.2f}"),
    ("ttff_ms", "TTFF ms", "{:.1f}"),
    ("peak_memory_mb", "peak MB", "{:.0f}"),
)

NOTES = (
    "SSIM, PSNR and the mouth metrics compare generated crops with the source crops at the model's size. "
    "Full-frame SSIM / PSNR paste each generated crop back into its source frames (the mouth box, feathered, "
    "through the data job's inverse warp; frames scaled to 512 px on their long side) and compare them with "
    "the source frames; full-frame FID / FVD use those frames, full-frame CSIM the face re-aligned from each "
    "output frame by the data job's warp (112 px) against the same from the source frame.",
    "Audio: each clip's own, or with audio_from=other each clip is driven by the next clip's audio "
    "(cross-identity: Sync-C / Sync-D then measure how well the student follows speech the face never said; "
    "the GT columns score the source crops against that audio, the level of an unedited mouth).",
    "Condition: the first frame as reference, the mouth-masked source video and the clip's audio "
    "(no clean-video latent: inference never reads it); 65-channel students also get the unmasked source "
    "frames as their reference sequence, as the released inference does, so their mouth-region numbers "
    "are not comparable with 49-channel ones.",
    "SSIM: Gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, mean over frames. Mouth metrics use the "
    "lower-face box the model regenerates (window.mask_box).",
    "CSIM: cosine similarity of the ArcFace embeddings (csim_model_pack) of each generated frame and its "
    "source crop, resized to 112 px (the crops are already aligned), mean over frames.",
    "Sync-C / Sync-D / offset: the configured SyncNet on the generated crops against the clip's audio; "
    "GT columns score the source crops the same way.",
    "Long-form: each long_form video streamed whole with its own audio through make infer's passes (face "
    "tracked per shot); every long_form_segment_s of output scored like a clip (its crops against the source "
    "crops, its audio); drift = last segment minus first.",
    "TTFF: a first-chunk pass per clip, from the first VAE encode (reference, the first chunk's frames) to the "
    "end of decoding its frames; the first wav2vec2 window's audio features (up to 10 s: the whole clip) are "
    "computed within it (one untimed warm-up pass before the first clip).",
    "FPS: generated frames per second of the streaming loop (each chunk's condition encode, two student "
    "calls, cache write, decode) over the chunks after the first; fps_end_to_end is over all chunks.",
)


def mean_row(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The mean of each number over the clips that have it (full-frame metrics may miss on some)."""
    keys = dict.fromkeys(k for row in rows for k, value in row.items() if isinstance(value, int | float))
    return {k: float(np.mean([row[k] for row in rows if k in row])) for k in keys}


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Lip Forcing eval: {report['student']}", ""]
    if report["profile"] == "tiny":
        lines += [f"**{TINY_WARNING}.**", ""]
    elif report["random_init"]:
        lines += [f"**random-init weights ({', '.join(report['random_init'])}): not a quality result.**", ""]
    lines += [
        f"profile `{report['profile']}`, student version {report['student_version'] or 'unregistered'}, "
        f"decoder `{report['decoder']}`, device `{report['device']}`, {report['size']} px aligned crops, "
        f"reference = {report['reference']}, audio = {report['audio']}, memory = {report['memory']}.",
        "",
    ]
    columns = [c for c in COLUMNS if c[0] in report["mean"]]
    lines.append("| clip | " + " | ".join(title for _, title, _ in columns) + " |")
    lines.append("|---" * (len(columns) + 1) + "|")
    for row in [*report["clips"], {"key": "**mean**", **report["mean"]}]:
        lines.append(
            f"| {row['key']} | " + " | ".join(fmt.format(row[key]) if key in row else "-" for key, _, fmt in columns) + " |"
        )
    lines.append("")
    lines += [
        f"- {name.upper().replace('FULL_', 'full-frame ')} over all clips: {value:.3f}" for name, value in report["set_metrics"].items()
    ]
    lines += [f"- {name} skipped: {reason}" for name, reason in report["skipped_metrics"].items()]
    lines += [f"- clip {item['key']} skipped: {item['reason']}" for item in report["skipped_clips"]]
    lines += render_long_form(report.get("long_form", {}))
    lines += ["", "## How the numbers are measured", "", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


LONG_FORM_COLUMNS = (("ssim", "SSIM", "{:.4f}"), ("mouth_psnr", "mouth PSNR dB", "{:.2f}"),
                     ("sync_c", "Sync-C", "{:.2f}"), ("sync_d", "Sync-D", "{:.2f}"))  # fmt: skip


def render_long_form(long_form: dict[str, Any]) -> list[str]:
    """The per-segment table of each long-form video and its drift (last segment minus first)."""
    if not long_form.get("segments"):
        return []
    columns = [c for c in LONG_FORM_COLUMNS if any(c[0] in row for row in long_form["segments"])]
    lines = ["", "## Long-form: per segment, and the drift from the first segment to the last", ""]
    lines.append("| video | segment | from s | to s | " + " | ".join(title for _, title, _ in columns) + " |")
    lines.append("|---" * (len(columns) + 4) + "|")
    for row in long_form["segments"]:
        values = " | ".join(fmt.format(row[key]) if key in row else "-" for key, _, fmt in columns)
        lines.append(f"| {row['video']} | {row['segment']} | {row['start_s']:.0f} | {row['end_s']:.0f} | {values} |")
    for drift in long_form["drift"]:
        changes = ", ".join(f"{title} {drift[key + '_drift']:+.4g}" for key, title, _ in columns if key + "_drift" in drift)
        lines.append(f"- {drift['video']} ({drift['minutes']:.1f} min, {drift['segments']} segments): {changes}")
    return lines


def write_outputs(report: dict[str, Any], folder: str, output: str) -> None:
    """report.json / report.md beside the samples in `folder`, then all of it to `output` and MLflow."""
    import mlflow

    with open(os.path.join(folder, "report.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(folder, "report.md"), "w") as handle:
        handle.write(render_markdown(report))
    storage.upload_folder(folder, output)
    mlflow.log_artifacts(folder)
