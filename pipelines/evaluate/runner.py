"""The models of one eval and what they measure per clip: generation, timing, memory, metrics."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data_jobs.media import to_uint8
from lipforcing import storage
from lipforcing.data import FPS, SAMPLE_RATE
from lipforcing.data.encode import LatentEncoder
from lipforcing.data.windows import lower_face_mask
from lipforcing.inference.conditions import ConditionStream, chunk_frame_counts
from lipforcing.inference.streaming import StreamChunk, stream_generate, streaming_fps
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
from lipforcing.models.conditioning import Condition
from lipforcing.models.syncnet import SyncModel, SyncNetConfig, load_syncnet, score_clip
from pipelines.evaluate.clips import EvalClip
from pipelines.evaluate.config import EvalConfig

FEATURE_BATCH = 32  # frames per call of the FID feature network


@dataclass
class Generation:
    frames: Tensor  # [T, 3, S, S] in [0, 1], on the CPU
    encode_s: float  # the condition encode, chunk by chunk (part of stream_s)
    stream_s: float  # streaming loop: all chunks, encode + denoise + cache write + decode
    fps: float  # steady state: frames per second over the chunks after the first
    chunks: int


class Evaluator:
    """The models of one eval, built once: encoder, student, stream decoder, optional SyncNet."""

    def __init__(self, config: EvalConfig, student_path: str, syncnet_path: str, device: torch.device):
        self.config, self.device = config, device
        self.encoder = LatentEncoder(config.model, config.window, device)
        self.student = build_student(config.model, device=device, weights=student_path).eval()
        if config.decoder == "tae":
            self.decoder = build_tae(config.model).to(device).eval().stream_decoder()
        else:
            self.decoder = self.encoder.vae.stream_decoder()  # its own cache: encodes may come between decodes
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

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.config.seed)

    def stream(self, chunks: Iterable[Tensor], reference: Tensor, audio: Tensor, num_frames: int,
               timing: dict[str, float] | None = None) -> Iterator[StreamChunk]:  # fmt: skip
        """The student over a stream of source crops: `chunks` yields each chunk's [n, 3, S, S] crops
        in [0, 1] (n by `chunk_frame_counts`), `reference` [3, S, S] is the identity frame, `audio` the
        16 kHz speech under the `num_frames` frames. Each chunk's condition is encoded as it arrives
        (memory stays flat for any length); `timing["encode_s"]` adds up the encoding. A 65-channel
        student also reads the unmasked crops as its reference sequence, as the released inference does."""
        timing = {} if timing is None else timing
        timing.setdefault("encode_s", 0.0)
        start = time.perf_counter()
        conditions = ConditionStream(self.encoder, reference[None, None], audio[None, : num_frames * (SAMPLE_RATE // FPS)], num_frames)
        timing["encode_s"] += time.perf_counter() - start

        def encoded() -> Iterator[Condition]:
            for frames in chunks:
                self._sync()
                start = time.perf_counter()
                cond = conditions.next(frames[None])
                self._sync()
                timing["encode_s"] += time.perf_counter() - start
                yield cond

        return stream_generate(self.student, encoded(), self.decoder, generator=self._generator())

    def _clip_stream(self, clip: EvalClip, timing: dict[str, float] | None = None) -> Iterator[StreamChunk]:
        frames = len(clip.video)
        counts = chunk_frame_counts(frames, self.config.model.chunk_frames)
        chunks = clip.video.split(counts)
        return self.stream(iter(chunks), clip.video[0], clip.audio, frames, timing)

    def time_to_first_frames(self, clip: EvalClip) -> float:
        """TTFF in ms as the paper defines it: from the first VAE encode (the reference and the first
        chunk's 4n-3 frames) to the end of decoding the first chunk's frames. The audio features of
        the first wav2vec2 window (up to 10 s, the whole of a 5-10 s clip) are computed within it."""
        self._sync()
        start = time.perf_counter()
        stream = self._clip_stream(clip)
        next(stream)
        self._sync()
        elapsed = time.perf_counter() - start
        stream.close()
        return 1000 * elapsed

    def generate(self, clip: EvalClip) -> Generation:
        """The whole clip, streamed chunk by chunk: encode, denoise, cache write, decode."""
        timing: dict[str, float] = {}
        chunks: list[StreamChunk] = []
        finished: list[float] = []
        self._sync()
        start = time.perf_counter()
        for chunk in self._clip_stream(clip, timing):
            self._sync()
            finished.append(time.perf_counter() - start)
            chunks.append(chunk)
        frames = torch.cat([c.frames[0].cpu() for c in chunks])
        return Generation(frames, timing["encode_s"], finished[-1], streaming_fps([c.frames.shape[1] for c in chunks], finished), len(chunks))

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
    def sync(self, frames: Tensor, audio: np.ndarray, prefix: str = "") -> dict[str, float]:
        """Sync-C / Sync-D / offset of uint8 crops [T, S, S, 3] against the 16 kHz audio under them."""
        result = score_clip(self.syncnet, frames, audio)
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


FULL_FRAME_SIDE = 512  # full frames are compared at most this many pixels on their long side
IDENTITY_SIDE = 112  # ArcFace's input: full-frame faces are re-aligned at this size


@dataclass
class FullFrames:
    """A clip's source frames and the same with the generated crops pasted back."""

    real: Tensor  # [T, 3, H, W] in [0, 1], scaled to FULL_FRAME_SIDE on the long side
    fake: Tensor
    real_faces: np.ndarray | None  # [T, 112, 112, 3] uint8: each full frame re-aligned by the data job's
    fake_faces: np.ndarray | None  # warp, the face an identity model sees in the output video (if asked)


def full_frames(clip: EvalClip, generated: Tensor, mask_box: list[float], faces: bool = True) -> FullFrames | str:
    """The source frames the clip was cut from, and those frames with the generated crops pasted
    back (the mouth box, feathered, through the data job's inverse warp); or why they cannot be read.
    With `faces`, also both re-aligned to the face (two warps per frame: only for CSIM)."""
    import cv2

    from data_jobs.media import VideoFrames, cfr_indices, timeline_frames
    from lipforcing.inference.paste import blend_mask, crop_affine, paste

    placement = clip.placement
    if placement is None:
        return "the shards carry no source and warp (affine.npy) for their crops"
    if not storage.exists(placement.source):
        return f"the source video is not readable here ({placement.source})"
    path = storage.cached(placement.source)  # one download per machine: a video's segments are scored in turn
    reader = VideoFrames(path)
    try:
        timestamps = reader.timestamps()
    finally:
        reader.close()
    source = timeline_frames(path, cfr_indices(timestamps, FPS, placement.start_s, len(generated)), timestamps=timestamps)  # seeks
    size, aligned = generated.shape[-1], placement.aligned_size
    mask = blend_mask(size, mask_box)
    pasted, original, warped = [], [], {"real": [], "fake": []}
    for frame, crop, affine in zip(source, to_uint8(generated).numpy(), placement.affines):
        edited = paste(frame, crop, crop_affine(affine, aligned, size), mask)
        height, width = frame.shape[:2]
        scale = min(1.0, FULL_FRAME_SIDE / max(height, width))
        shape = (max(1, round(width * scale)), max(1, round(height * scale)))
        pasted.append(cv2.resize(edited, shape, interpolation=cv2.INTER_AREA))
        original.append(cv2.resize(frame, shape, interpolation=cv2.INTER_AREA))
        for side, image in (("real", frame), ("fake", edited)) if faces else ():
            face = cv2.warpAffine(image, affine, (aligned, aligned), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            warped[side].append(cv2.resize(face, (IDENTITY_SIDE, IDENTITY_SIDE), interpolation=cv2.INTER_AREA))
    fake, real = (torch.from_numpy(np.stack(v)).permute(0, 3, 1, 2).float() / 255 for v in (pasted, original))
    return FullFrames(real, fake, *(np.stack(warped[side]) if faces else None for side in ("real", "fake")))


def full_frame_metrics(frames: FullFrames, identity: IdentityEmbedder | None = None) -> dict[str, float]:
    """SSIM and PSNR of the pasted frames against the source frames; with an identity model, CSIM of
    the re-aligned faces."""
    row = {"full_ssim": float(ssim(frames.fake, frames.real).mean()), "full_psnr": float(psnr(frames.fake, frames.real).mean())}
    if identity is not None:
        row["full_csim"] = csim(identity, frames.real_faces, frames.fake_faces)
    return row


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
        "fps_end_to_end": frames / generation.stream_s,
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
        audio = clip.audio.numpy()
        row.update(evaluator.sync(to_uint8(generation.frames), audio))
        row.update(evaluator.sync(to_uint8(clip.video), audio, prefix="gt_"))
    return row, generation.frames


# (report key, column title, format) for the per-clip table
