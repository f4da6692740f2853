"""One task's ingest: each input through the input stages, each of its segments through the segment
stages, into the task's shard writer. The job (`job.py`) decides which inputs form a task and
commits what this returns.

Ingest transforms, in order:
  per input:    probe -> resample -> shots
  per segment:  faces -> align -> iqa -> encode -> shard writer
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from data_jobs.align import Align
from data_jobs.config import DataJobConfig
from data_jobs.faces import Faces
from data_jobs.inputs import InputItem
from data_jobs.iqa import Iqa
from data_jobs.manifest import manifest_row, reject_row
from data_jobs.pipeline import Sample, Transform, run_stages
from data_jobs.probe import Probe
from data_jobs.resample import Resample
from data_jobs.shots import Shots
from data_jobs.writer import Encode
from lipforcing import storage

# Stage names in pipeline order (the summary's timing table follows it).
STAGE_ORDER = ("probe", "resample", "shots", "faces", "align", "iqa", "encode", "upload", "score")


def input_stages(config: DataJobConfig) -> list[Transform]:
    return [Probe(), Resample(config.ingest), Shots(config.ingest)]


def segment_stages(config: DataJobConfig, digest: str) -> list[Transform]:
    return [Faces(config.faces), Align(config.align), Iqa(config.iqa), Encode(config.write, digest)]


@dataclass
class IngestResult:
    samples: list[dict[str, Any]] = field(default_factory=list)  # manifest rows
    rejects: list[dict[str, Any]] = field(default_factory=list)  # reject rows
    timings_s: dict[str, float] = field(default_factory=dict)
    clip_seconds_in: float = 0.0


def ingest_inputs(
    items: list[InputItem], config: DataJobConfig, digest: str, write: Callable[[InputItem, str, dict[str, bytes]], str]
) -> IngestResult:
    """Run every input of a task; `write(item, key, members)` stores one sample, returns its shard."""
    result = IngestResult()
    per_input, per_segment = input_stages(config), segment_stages(config, digest)
    for item in items:
        sample = Sample(
            source=item.video, dataset=item.dataset, key_stem=item.key_stem, audio_source=item.audio,
            identity=item.identity, split=item.split,
        )
        with _local_inputs(sample, result.timings_s) as sample:
            if not sample.failed:
                sample = run_stages(sample, per_input, result.timings_s)
            result.clip_seconds_in += sample.info.duration_s if sample.info else 0.0
            result.rejects += [reject_row(sample, r) for r in sample.rejects]
            if sample.failed:
                continue
            for start, end in sample.segments:
                segment = run_stages(sample.segment(start, end), per_segment, result.timings_s)
                result.rejects += [reject_row(segment, r) for r in segment.rejects]
                if not segment.failed:
                    shard = write(item, segment.key, segment.outputs)
                    result.samples.append(manifest_row(segment.metadata, shard))
    return result


@contextlib.contextmanager
def _local_inputs(sample: Sample, timings: dict[str, float]):
    """Local copies of the video and its paired audio for the decoders (download counts as probe)."""
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        try:
            sample.video_path = stack.enter_context(storage.temporary_local(sample.source))
            if sample.audio_source:
                sample.audio_path = stack.enter_context(storage.temporary_local(sample.audio_source))
        except Exception as err:  # missing object, permission, network: this input only
            sample.fail("probe", "unreadable", f"download failed: {type(err).__name__}: {err}"[:300], True)
        timings["probe"] = timings.get("probe", 0.0) + time.perf_counter() - started
        yield sample
