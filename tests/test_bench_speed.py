"""The speed benchmarks' bookkeeping: the `bench` profile, TTFF's boundaries, the section, the GPU script's
CPU dry run. No timing is asserted (speed lives in benchmarks/RESULTS.md)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import gpu_speed
from benchmarks.bench_speed import Parts, SpeedResult, Timeline, clip_batch, markdown, minimal_width, ttff
from benchmarks.gpu_speed import measure, parse
from lipforcing.data.encode import LatentEncoder
from lipforcing.data.windows import WindowConfig
from lipforcing.models import build_student, build_tae, build_vae, model_config, random_condition

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Two threads on cores shared with other jobs spin-wait for each other; one is faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_profile_shape():
    """Heads of 64 like the real profiles, the released 65 input channels, decoders between tiny and real."""
    cfg = model_config("bench")
    assert (cfg.dim, cfg.num_heads, cfg.head_dim, cfg.ffn_dim, cfg.num_layers) == (768, 12, 64, 3072, 8)
    assert cfg.in_channels == 65 and cfg.rope_split == (24, 20, 20)
    assert (cfg.vae_base_dim, cfg.vae_num_res_blocks, cfg.tae_channels) == (20, 2, [48, 24, 12, 12])
    assert (cfg.text_len, cfg.text_dim, cfg.audio_feature_dim) == (32, 256, 256)
    assert list(cfg.audio_blocks) == [2, 3, 4]
    small = minimal_width(cfg)
    assert (small.dim, small.num_heads, small.head_dim, small.num_layers) == (64, 1, 64, 8)


def flops_per_pixel(profile: str, latent_hw: int) -> dict[str, float]:
    """FLOPs per output pixel of the Wan VAE and TAE decodes and of the student's 3 calls per latent frame
    (torch's FLOP counter on the meta device: nothing is allocated or computed)."""

    def count(fn: object) -> int:
        with FlopCounterMode(display=False) as mode, torch.no_grad():
            fn()
        return mode.get_total_flops()

    cfg = model_config(profile)
    with torch.device("meta"):
        vae, tae = build_vae(cfg), build_tae(cfg)
    z = torch.zeros(1, 16, 2, 4, 4, device="meta")  # 5 frames of 32x32 pixels
    student = build_student(cfg, device="meta")
    cond = random_condition(cfg, 1, 3, latent_hw, latent_hw).to("meta")
    x, cache = torch.zeros(1, 16, 3, latent_hw, latent_hw, device="meta"), student.new_cache()
    write = count(lambda: student.cache_clean_chunk(x, cond, cache))
    call = count(lambda: student.forward_chunk(x, torch.zeros(1, device="meta"), cond, cache))
    return {
        "vae": count(lambda: vae.decode(z)) / (5 * 32 * 32),
        "tae": count(lambda: tae.decode(z)) / (5 * 32 * 32),
        "dit": (write + 2 * call) / 3 / (8 * latent_hw) ** 2,
    }


def test_bench_decoders_keep_the_1_3b_decoder_to_dit_compute():
    """bench at 128x128 vs 1.3b at 512x512: decoder FLOPs over DiT FLOPs per pixel within 25%, so the
    decode's share of a clip is not an artefact of the scaled-down profile."""
    real, bench = flops_per_pixel("1.3b", 64), flops_per_pixel("bench", 16)
    assert real["dit"] / bench["dit"] == pytest.approx(25, rel=0.05)
    for decoder in ("vae", "tae"):
        assert bench[decoder] / bench["dit"] == pytest.approx(real[decoder] / real["dit"], rel=0.25), decoder


def test_ttff_runs_from_the_first_vae_encode_to_the_first_chunks_last_decode():
    """A planted clock that ticks once per mark: TTFF counts exactly the marks between the boundaries."""
    cfg = model_config("tiny")
    encoder = LatentEncoder(cfg, WindowConfig(frames=17, size=64))
    student, tae = build_student(cfg).eval(), build_tae(cfg)
    ticks = itertools.count()
    timeline = Timeline(clock=lambda: float(next(ticks)))
    first = ttff(encoder, student, tae.stream_decoder(), clip_batch(17, 64, False), timeline)
    names = [name for name, _ in timeline.events]
    assert names[-2:] == ["decode_start", "decode_end"] and names.count("decode_end") == 1  # the first chunk only
    start = names.index("vae_encode")
    assert names[:start] == ["start"]  # the stream's setup begins with the reference frame's encode
    assert names.count("vae_encode") >= 2  # the reference, then the first chunk
    assert first == len(names) - 1 - start


def test_loop_fps_and_shares():
    parts = Parts(encode=1.0, denoise=2.0, decode=1.0, frames=33, chunk_ends=[1.0, 2.0, 4.0], chunk_frames=[9, 12, 12])
    assert parts.total == 4.0 and parts.shares() == (0.25, 0.5, 0.25)
    assert parts.loop_fps == 24 / 3.0


def planted_result() -> SpeedResult:
    teacher = Parts(2.0, 96.0, 2.0, 81)
    return SpeedResult(
        profile="bench",
        frames=81,
        size=128,
        teacher={"TAE": teacher, "Wan VAE": Parts(2.0, 96.0, 6.0, 81)},
        student={"TAE": Parts(2.0, 1.5, 0.5, 81, [1.0, 1.5], [9, 12]), "Wan VAE": Parts(0.5, 1.5, 1.2, 81, [1.0, 2.0], [9, 12])},
        ttff={"TAE": 0.25, "Wan VAE": 0.5},
        shape="dim 768",
        call_s=0.1,
        minimal_call_s=0.005,
        repeats=3,
        machine="test machine",
    )


def test_section_renders_ratios_shares_and_verdicts():
    text = markdown(planted_result())
    assert text.startswith("## Speed\n") and "test machine" in text and "`python -m benchmarks.bench_speed --write`" in text
    assert "| 2.00 (50.0%) | 1.50 (37.5%) | 0.50 (12.5%) | 4.00 | 20.25 | **25.0x** |" in text
    assert "| 2.00 (1.9%) | 96.00 (92.3%) | 6.00 (5.8%) | 104.00 | 0.78 | 1x |" in text
    assert "| **32.5x** |" in text  # 104 / 3.2
    assert "Denoising alone: teacher / student 64.0x-64.0x" in text
    assert "at most 40x (TAE), 61x (Wan VAE)" in text  # 100 / 2.5, 104 / 1.7
    assert "encoded beforehand): 49.0x (TAE), 37.8x (Wan VAE)." in text  # 98 / 2, 102 / 2.7
    assert "| TAE | 250 | 24.0 |" in text and "| Wan VAE | 500 | 12.0 |" in text
    assert "**5.0%** < 10%" in text
    assert "TAE 25.0x vs 30x wanted: NOT met; Wan VAE 32.5x vs 20x wanted: met" in text


def test_gpu_script_rejects_unknown_variants():
    with pytest.raises(SystemExit):
        parse(["--variants", "eager,warp"])


DRY_RUN = ["--profile", "tiny", "--device", "cpu", "--dtype", "float32", "--size", "64", "--frames", "17", "--repeats", "1"]


def test_gpu_script_dry_run_on_cpu(monkeypatch):
    """The whole script at the tiny profile: a fresh process for the variant, the section from its row."""
    monkeypatch.chdir(ROOT)  # the variant's process finds `benchmarks` from the repository root
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # and uses one thread too
    text = gpu_speed.main([*DRY_RUN, "--variants", "eager"])
    assert text.startswith("## GPU speed") and "--variants eager" in text
    row = next(line for line in text.splitlines() if line.startswith("| eager |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "n/a" and cells[5] == "n/a"  # no CUDA peak on a CPU, no teacher asked for


def test_gpu_script_student_and_teacher_in_process():
    torch.manual_seed(0)
    args = parse([*DRY_RUN, "--decoder", "tae", "--teacher-steps", "2"])
    student = measure(args, "flash")
    assert student["variant"] == "flash" and student["peak_gib"] is None
    assert student["fps"] > 0 and student["ttff_ms"] > 0 and student["clip_s"] > 0
    teacher = gpu_speed.measure_teacher(args)
    text = gpu_speed.markdown(args, [student, teacher], "test machine", "python -m benchmarks.gpu_speed")
    row = next(line for line in text.splitlines() if line.startswith("| flash |"))
    assert row.endswith(f"| {teacher['clip_s'] / student['clip_s']:.1f}x |")
    assert "| teacher, 50 steps, CFG, eager |" in text
