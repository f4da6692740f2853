"""`make eval`: stream a trained student over held-out clips, score it, report, log to MLflow.

    python -m pipelines.evaluate data=s3://bucket/heldout student_weights=models:/lipforcing-student@candidate

Per clip: the longest 4k+1-frame prefix that has audio, resized to `window.size`, with the clip's
first frame as the reference. The condition is encoded (Wan VAE, wav2vec2, mouth mask), the student
generates it chunk by chunk with the two-step schedule, and the stream decoder turns each chunk into
frames as it arrives. Generated frames are compared with the source crops they replace (nothing is
pasted back into the full frame): SSIM, PSNR, mouth-region PSNR and L1, Sync-C / Sync-D / AV offset
(also of the source crops, the ground-truth row), CSIM, FPS, TTFF and peak memory. FID / FVD run only
with local feature-network weights, CSIM only with an InsightFace model pack (its ArcFace model).

Timing. TTFF: a separate first-chunk pass per clip, from the start of encoding the first chunk's
inputs (its 4n-3 frames, reference and audio) to the end of decoding its frames, as in the paper
(there the encoder and decoder are both the VAE; here the decoder is `decoder`). FPS: frames per
second of the streaming loop (denoise + cache write + decode) over the chunks after the first; the
whole-clip encode is timed apart (`encode_s`) and folded into `fps_end_to_end`.
Results go to `<output>/report.{json,md}`, `<output>/samples/*.mp4` (source | generated, with the
clip's audio) and an MLflow run `eval` tagged with the student's registered version.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from data_jobs.media import encode_mp4, to_uint8
from lipforcing import storage
from lipforcing.config import ClusterConfig, ConfigError, to_yaml
from lipforcing.data import FPS, SAMPLE_RATE
from lipforcing.data.encode import LatentEncoder
from lipforcing.data.shards import Clip, Reader, decode_clip, epoch_samples, shard_urls
from lipforcing.data.windows import WindowConfig, lower_face_mask, resize_frames
from lipforcing.inference.streaming import StreamChunk, stream_generate
from lipforcing.metrics.csim import IdentityEmbedder, csim
from lipforcing.metrics.fid import (
    FeatureExtractor,
    feature_statistics,
    frechet_distance,
    i3d_extractor,
    inception_extractor,
    load_torchscript,
)
from lipforcing.metrics.ssim import psnr, ssim
from lipforcing.models import build_student, build_tae
from lipforcing.models.config import ModelConfig, model_config
from lipforcing.models.syncnet import SyncModel, SyncNetConfig, load_syncnet, score_clip
from pipelines.jobs import run_job
from pipelines.ray_cluster import in_submitted_job, ray_node, run_on_worker

TINY_WARNING = "tiny profile, random-init models: not a quality result"
FEATURE_BATCH = 32  # frames per call of the FID feature network

log = logging.getLogger("lipforcing.eval")


@dataclass
class EvalConfig:
    profile: str = "tiny"
    # Registered models (models:/name@alias) or paths/URLs. Not `student` / `syncnet`: those names
    # are sections of the shared profile YAML. An empty syncnet_weights skips Sync-C / Sync-D.
    student_weights: str = "models:/lipforcing-student@candidate"  # the distill job's dit.safetensors
    syncnet_weights: str = "models:/syncnet@champion"
    # Held-out shards: the data job writes identities kept out of training to <its output>/heldout
    # (a folder with shards/, or of *.tar).
    data: str = "outputs/data/heldout"
    output: str = "outputs/eval"  # report.json, report.md, samples/, config.yaml
    clips: int = 8  # at most this many clips, in the seed's shard order
    max_frames: int = 0  # evaluate at most this many frames of each clip (0: the whole clip)
    decoder: Literal["tae", "vae"] = "tae"  # streaming decoder
    samples: int = 2  # side-by-side sample videos written and logged
    fid_weights: str = ""  # TorchScript Inception-v3 (inception-2015-12-05.pt); "" skips FID
    fvd_weights: str = ""  # TorchScript I3D (i3d_torchscript.pt); "" skips FVD
    csim_model_pack: str = ""  # InsightFace model-pack folder (buffalo_l), local or s3://; "" skips CSIM
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0  # shard order and the student's sampling noise
    window: WindowConfig = field(default_factory=WindowConfig)  # size and mask_box are used
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @classmethod
    def for_profile(cls, profile: str) -> EvalConfig:
        return cls(profile=profile, model=model_config(profile))


@dataclass
class EvalClip:
    """One clip cut to what is evaluated: frames resized to the model's size, audio under them."""

    key: str
    video: Tensor  # [T, 3, S, S] in [0, 1], T = 4k + 1
    audio: Tensor  # [T * 640] float32, 16 kHz


@dataclass
class Generation:
    frames: Tensor  # [T, 3, S, S] in [0, 1], on the CPU
    encode_s: float  # whole-clip condition encode
    stream_s: float  # streaming loop: all chunks, denoise + cache write + decode
    fps: float  # steady state: frames per second over the chunks after the first
    chunks: int


def validate(config: EvalConfig) -> None:
    if config.clips < 1:
        raise ConfigError(f"config key 'clips' is {config.clips}; allowed values: an integer >= 1")
    if config.samples < 0:
        raise ConfigError(f"config key 'samples' is {config.samples}; allowed values: an integer >= 0")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "config key 'device' is 'cuda' but no CUDA device is visible; allowed values: 'auto', 'cpu'"
        )


def eval_length(clip: Clip) -> int:
    """Frames evaluated: the longest 4k+1 prefix that has audio under every frame (0 if none)."""
    total = min(len(clip.frames), len(clip.audio) * FPS // clip.sample_rate)
    return (total - 1) // 4 * 4 + 1 if total > 0 else 0


def prepare_clip(clip: Clip, size: int, min_frames: int, max_frames: int = 0) -> EvalClip | str:
    """The evaluated cut of a clip (at most `max_frames` when > 0), or the reason it is skipped."""
    if clip.sample_rate != SAMPLE_RATE:
        return f"audio at {clip.sample_rate} Hz; the data job writes {SAMPLE_RATE} Hz"
    frames = eval_length(clip)
    if max_frames > 0 and frames > max_frames:
        frames = (max_frames - 1) // 4 * 4 + 1
    if frames < min_frames:
        return f"{frames} usable frames; the first chunk alone needs {min_frames}"
    per_frame = clip.sample_rate // FPS
    audio = torch.from_numpy(np.ascontiguousarray(clip.audio[: frames * per_frame], dtype=np.float32))
    return EvalClip(clip.key, resize_frames(clip.frames[:frames], size), audio)


class Evaluator:
    """The models of one eval, built once: encoder, student, stream decoder, optional SyncNet."""

    def __init__(self, config: EvalConfig, student_path: str, syncnet_path: str, device: torch.device):
        self.config, self.device = config, device
        self.encoder = LatentEncoder(config.model, config.window, device)
        self.student = build_student(config.model, device=device, weights=student_path).eval()
        if config.decoder == "tae":
            self.decoder = build_tae(config.model).to(device).eval().stream_decoder()
        else:
            self.decoder = self.encoder.vae.stream_decoder()  # the stream resets after every encode
        self.syncnet: SyncModel | None = None
        if syncnet_path:
            self.syncnet = load_syncnet(SyncNetConfig(weights=syncnet_path), key="syncnet_weights").to(device)
        self.identity: IdentityEmbedder | None = None
        if config.csim_model_pack:
            storage.require(config.csim_model_pack, "csim_model_pack")
            pack = storage.cached(config.csim_model_pack)
            self.identity = IdentityEmbedder(pack, "csim_model_pack")
        self.first_chunk_frames = 4 * config.model.chunk_frames - 3
        mouth = 1 - lower_face_mask(config.window.size, config.window.mask_box)[0, 0]
        self.mouth = mouth.to(device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _batch(self, clip: EvalClip, frames: int) -> dict[str, Tensor | None]:
        """The condition's inputs. A 65-channel student also reads the unmasked source frames as its
        reference sequence, as the released inference does (its clips are the 81-frame segments)."""
        video = clip.video[None, :frames]
        return {
            "video": video,
            "reference": video[:, :1],
            "reference_sequence": video if self.config.model.use_reference_sequence else None,
            "audio": clip.audio[None, : frames * (SAMPLE_RATE // FPS)],
        }

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.config.seed)

    def time_to_first_frames(self, clip: EvalClip) -> float:
        """TTFF in ms: encode the first chunk's inputs, generate the chunk, decode its frames."""
        self._sync()
        start = time.perf_counter()
        cond = self.encoder.condition(self._batch(clip, self.first_chunk_frames))
        stream = stream_generate(self.student, cond, self.decoder, generator=self._generator())
        next(stream)
        self._sync()
        elapsed = time.perf_counter() - start
        stream.close()
        return 1000 * elapsed

    def generate(self, clip: EvalClip) -> Generation:
        """The whole clip, encoded once, then streamed chunk by chunk through the decoder."""
        self._sync()
        start = time.perf_counter()
        cond = self.encoder.condition(self._batch(clip, len(clip.video)))
        self._sync()
        encode_s = time.perf_counter() - start
        chunks: list[StreamChunk] = []
        finished: list[float] = []
        start = time.perf_counter()
        for chunk in stream_generate(self.student, cond, self.decoder, generator=self._generator()):
            self._sync()
            finished.append(time.perf_counter() - start)
            chunks.append(chunk)
        frames = torch.cat([c.frames[0].cpu() for c in chunks])
        counts = [c.frames.shape[1] for c in chunks]
        if len(chunks) > 1:
            fps = sum(counts[1:]) / (finished[-1] - finished[0])
        else:
            fps = counts[0] / finished[0]  # one chunk: no steady state to separate out
        return Generation(frames, encode_s, finished[-1], fps, len(chunks))

    @torch.no_grad()
    def fidelity(self, clip: EvalClip, generated: Tensor) -> dict[str, float]:
        source, fake = clip.video.to(self.device), generated.to(self.device)
        mouth_error = ((fake - source).abs() * self.mouth).sum(dim=(-3, -2, -1)) / (3 * self.mouth.sum())
        return {
            "ssim": float(ssim(fake, source).mean()),
            "psnr": float(psnr(fake, source).mean()),
            "mouth_psnr": float(psnr(fake, source, mask=self.mouth).mean()),
            "mouth_l1": float(mouth_error.mean()),
        }

    @torch.no_grad()
    def sync(self, frames: Tensor, audio: Tensor, prefix: str = "") -> dict[str, float]:
        result = score_clip(self.syncnet, to_uint8(frames), audio.numpy())
        return {
            f"{prefix}sync_c": result.confidence,
            f"{prefix}sync_d": result.min_dist,
            f"{prefix}av_offset": float(result.offset),
        }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the clip started. CPU: the process's peak RSS so far (Linux KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def feature_networks(
    config: EvalConfig, device: torch.device
) -> tuple[dict[str, FeatureExtractor], dict[str, str]]:
    """The Fréchet-distance extractors that have weights, and why the others are skipped."""
    extractors: dict[str, FeatureExtractor] = {}
    skipped: dict[str, str] = {}
    if config.fid_weights:
        extractors["fid"] = inception_extractor(load_torchscript(config.fid_weights, "fid_weights", device))
    else:
        skipped["FID"] = (
            "needs Inception-v3 weights: set fid_weights to a local inception-2015-12-05.pt (TorchScript)"
        )
    if config.fvd_weights:
        extractors["fvd"] = i3d_extractor(load_torchscript(config.fvd_weights, "fvd_weights", device))
    else:
        skipped["FVD"] = "needs I3D weights: set fvd_weights to a local i3d_torchscript.pt (TorchScript)"
    return extractors, skipped


class FeatureSets:
    """Source and generated features, accumulated clip by clip (frames for FID, clips for FVD)."""

    def __init__(self, extractors: dict[str, FeatureExtractor], device: torch.device):
        self.extractors, self.device = extractors, device
        self.features: dict[str, dict[str, list[Tensor]]] = {
            name: {"real": [], "fake": []} for name in extractors
        }

    def add(self, source: Tensor, generated: Tensor) -> None:
        for name, extract in self.extractors.items():
            for side, frames in (("real", source), ("fake", generated)):
                if name == "fid":
                    batches = [frames[i : i + FEATURE_BATCH] for i in range(0, len(frames), FEATURE_BATCH)]
                    features = torch.cat([extract(b.to(self.device)) for b in batches])
                else:
                    features = extract(frames[None].to(self.device))
                self.features[name][side].append(features.cpu())

    def distances(self) -> tuple[dict[str, float], dict[str, str]]:
        """Each metric over the whole set, and the ones that could not be computed (with why)."""
        values, skipped = {}, {}
        for name, sides in self.features.items():
            real, fake = torch.cat(sides["real"]), torch.cat(sides["fake"])
            if len(real) < 2:
                skipped[name.upper()] = f"{len(real)} feature vector(s); a covariance needs at least 2"
                continue
            values[name] = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
        return values, skipped


def evaluate_clip(
    evaluator: Evaluator, clip: EvalClip, device: torch.device
) -> tuple[dict[str, Any], Tensor]:
    """One clip's report row and its generated frames."""
    reset_peak_memory(device)
    ttff_ms = evaluator.time_to_first_frames(clip)
    generation = evaluator.generate(clip)
    frames = len(generation.frames)
    row: dict[str, Any] = {
        "key": clip.key,
        "frames": frames,
        **evaluator.fidelity(clip, generation.frames),
        "fps": generation.fps,
        "fps_end_to_end": frames / (generation.encode_s + generation.stream_s),
        "ttff_ms": ttff_ms,
        "encode_s": generation.encode_s,
        "chunks": generation.chunks,
        "peak_memory_mb": peak_memory_mb(device),
    }
    if evaluator.identity is not None:
        row["csim"] = csim(
            evaluator.identity, to_uint8(clip.video).numpy(), to_uint8(generation.frames).numpy()
        )
    if evaluator.syncnet is not None:
        row.update(evaluator.sync(generation.frames, clip.audio))
        row.update(evaluator.sync(clip.video, clip.audio, prefix="gt_"))
    return row, generation.frames


# (report key, column title, format) for the per-clip table
COLUMNS = (
    ("frames", "frames", "{:.0f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("psnr", "PSNR dB", "{:.2f}"),
    ("mouth_psnr", "mouth PSNR dB", "{:.2f}"),
    ("mouth_l1", "mouth L1", "{:.4f}"),
    ("csim", "CSIM", "{:.4f}"),
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
    "Generated frames are compared with the source crops at the model's size; nothing is pasted back.",
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
    "TTFF: a first-chunk pass per clip, from the start of encoding the first chunk's inputs to the end of "
    "decoding its frames (one untimed warm-up pass before the first clip).",
    "FPS: generated frames per second of the streaming loop (two student calls, cache write, decode) over "
    "the chunks after the first; fps_end_to_end also counts the whole-clip condition encode.",
)


def mean_row(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, value in rows[0].items() if isinstance(value, int | float)]
    return {k: float(np.mean([row[k] for row in rows])) for k in keys}


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Lip Forcing eval: {report['student']}", ""]
    if report["profile"] == "tiny":
        lines += [f"**{TINY_WARNING}.**", ""]
    elif report["random_init"]:
        lines += [f"**random-init weights ({', '.join(report['random_init'])}): not a quality result.**", ""]
    lines += [
        f"profile `{report['profile']}`, student version {report['student_version'] or 'unregistered'}, "
        f"decoder `{report['decoder']}`, device `{report['device']}`, {report['size']} px aligned crops, "
        f"reference = {report['reference']}, memory = {report['memory']}.",
        "",
    ]
    columns = [c for c in COLUMNS if c[0] in report["mean"]]
    lines.append("| clip | " + " | ".join(title for _, title, _ in columns) + " |")
    lines.append("|---" * (len(columns) + 1) + "|")
    for row in [*report["clips"], {"key": "**mean**", **report["mean"]}]:
        lines.append(
            f"| {row['key']} | " + " | ".join(fmt.format(row[key]) for key, _, fmt in columns) + " |"
        )
    lines.append("")
    lines += [
        f"- {name.upper()} over all clips: {value:.3f}" for name, value in report["set_metrics"].items()
    ]
    lines += [f"- {name} skipped: {reason}" for name, reason in report["skipped_metrics"].items()]
    lines += [f"- clip {item['key']} skipped: {item['reason']}" for item in report["skipped_clips"]]
    lines += ["", "## How the numbers are measured", "", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict[str, Any], folder: str, output: str) -> None:
    """report.json / report.md beside the samples in `folder`, then all of it to `output` and MLflow."""
    import mlflow

    with open(os.path.join(folder, "report.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(folder, "report.md"), "w") as handle:
        handle.write(render_markdown(report))
    storage.upload_folder(folder, output)
    mlflow.log_artifacts(folder)


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


def heldout_shards(data: str) -> list[str]:
    """The shards to evaluate, or a config error that says where held-out shards come from."""
    try:
        return shard_urls(data)
    except FileNotFoundError as err:
        raise ConfigError(
            f"config key 'data' is {data!r}: {err}. The data job writes the identities it holds out of "
            "training to <output>/heldout (split.* in data_jobs/config.py): run `make data`, or give "
            "data=<held-out shards>"
        ) from err


def run_eval(config: EvalConfig, scratch: str) -> int:
    import mlflow

    from pipelines import tracking

    shards = heldout_shards(config.data)  # before any model loads
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
        mlflow.set_tags(
            {
                "ray_node": ray_node(),
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
        features = FeatureSets(extractors, device)
        rows: list[dict[str, Any]] = []
        skipped_clips: list[dict[str, str]] = []
        for sample in epoch_samples(shards, Reader(), seed=config.seed, epoch=0):
            if len(rows) >= config.clips:
                break
            clip = prepare_clip(decode_clip(sample), config.window.size, evaluator.first_chunk_frames, config.max_frames)
            if isinstance(clip, str):
                skipped_clips.append({"key": sample["__key__"], "reason": clip})
                continue
            if not rows:
                evaluator.time_to_first_frames(clip)  # warm-up: one-time costs stay out of the first TTFF
            row, generated = evaluate_clip(evaluator, clip, device)
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
        set_metrics, too_few = features.distances()
        report = {
            "profile": config.profile,
            "student": config.student_weights,
            "student_version": student_version,
            "syncnet": config.syncnet_weights,
            "decoder": config.decoder,
            "device": str(device),
            "size": config.window.size,
            "reference": "the first frame of each clip",
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
            "notes": list(NOTES),
            "mlflow_run_id": run.info.run_id,
        }
        tracking.log_metrics({**report["mean"], **set_metrics})
        write_outputs(report, folder, config.output)
    log.info("%d clips; report at %s", len(rows), storage.join(config.output, "report.md"))
    return 0


if __name__ == "__main__":
    sys.exit(run_job("pipelines.evaluate", EvalConfig, evaluate, validate=validate))
