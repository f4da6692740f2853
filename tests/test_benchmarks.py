"""The benchmarks' own correctness: the sync loop reference agrees with the batched metric, and the
`make bench` runner parses its arguments. No timing here (speed lives in benchmarks/RESULTS.md)."""

from __future__ import annotations

import sys

import pytest

from benchmarks.__main__ import ORDER, BenchConfig, command, parse_args, selected, write_header
from benchmarks.bench_sync import check_equal, loop_sync, random_embeddings
from benchmarks.results import write_section
from lipforcing.config import ConfigError
from lipforcing.metrics.sync import av_sync


def test_sync_loop_matches_batched_metric():
    video, audio = random_embeddings(clips=3, frames=40, dim=32, seed=1)
    check_equal(video, audio)  # offsets exact, Sync-C and Sync-D within 1e-4, batch included
    offset, _, _ = loop_sync(video[0], audio[0])
    assert offset == av_sync(video[0], audio[0]).offset == -2  # audio is the video delayed by 2 frames


def test_runner_defaults_run_everything_in_order():
    config = parse_args([])
    assert config == BenchConfig()
    assert selected(config) == list(ORDER) == ["memory", "model", "speed", "infer", "sync", "train", "loader", "learn", "bookkeeping", "data"]
    assert command("sync", config) == [sys.executable, "-m", "benchmarks.bench_sync", "--write"]


def test_runner_only_and_write():
    config = parse_args(["only=train,sync", "write=false", "data=/tmp/shards"])
    assert selected(config) == ["sync", "train"]  # the fixed order, not the order given
    assert command("train", config)[-3:] == ["benchmarks.bench_train", "--data", "/tmp/shards"]
    assert "--write" not in command("sync", config)


@pytest.mark.parametrize("argv", [["only=sync,nope"], ["speed=fast"], ["write=maybe"]])
def test_runner_rejects_bad_arguments(argv):
    with pytest.raises(ConfigError):
        parse_args(argv)


def test_sections_and_header_leave_other_sections_alone(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# old title\n\n## Model\n\nmodel numbers\n\n## Data\n\ndata numbers\n")
    write_section("## Sync metric\n\nfirst\n", "## Sync metric", results)
    write_section("## Sync metric\n\nsecond\n", "## Sync metric", results)
    write_header(results)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n") and "old title" not in text
    assert "model numbers" in text and "data numbers" in text
    assert "second" in text and "first" not in text and text.count("## Sync metric") == 1


def test_memory_report_follows_the_profiles():
    """The frozen 14B teacher: 2 bytes per parameter split over the 4 GPUs under ZeRO-3 (the 14b DMD
    profile), whole at 4 bytes before; every current profile stage fits an 80 GB GPU by this count."""
    from benchmarks.bench_memory import GPU_GB, parameter_counts, stage_memory
    from pipelines.distill_config import DistillConfig
    from pipelines.jobs import resolve_config

    config = resolve_config(DistillConfig, ["profile=14b"])
    teacher = parameter_counts(config.teacher_model, 128)[0]
    assert config.dmd.train.zero_stage == 3 and config.dmd.train.num_workers is None  # the cluster's GPUs: 4 in the paper
    assert stage_memory(config, "dmd")["frozen teacher"] == pytest.approx(2 * teacher / 4 / 1e9)
    assert stage_memory(config, "dmd", frozen_teacher_fp32=True)["frozen teacher"] == pytest.approx(4 * teacher / 1e9)
    for profile in ("1.3b", "14b"):
        config = resolve_config(DistillConfig, [f"profile={profile}"])
        for stage in ("teacher", "student", "dmd"):
            memory = stage_memory(config, stage)
            assert memory["total"] == pytest.approx(sum(v for k, v in memory.items() if k != "total"))
            assert memory["total"] < GPU_GB, (profile, stage, memory)
