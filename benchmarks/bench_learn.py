"""Does each stage optimise what it should? The tiny profile trained on real clips, checked in numbers.

    python -m benchmarks.bench_learn                 # print the markdown section
    python -m benchmarks.bench_learn --write         # also replace its section in RESULTS.md + the plot
    python -m benchmarks.bench_learn --real DIR      # the real clips (default ../shared/data/real)

The real pipeline, as a user runs it: `pipelines.data` on the real talking-head clips (64-px crops,
no SyncNet filter), `pipelines.encode` (16 windows per clip into a latent cache), then
`pipelines.distill` from that cache with longer stages than the demo (teacher base from random init,
teacher LoRA, Diffusion Forcing student, DMD without the SyncNet reward). Then, side by side in one
process on the same windows, each model samples from the same conditions:

- the kept (non-mouth) region: SSIM of the decoded sample against the decoded clean latent (the same
  tiny random VAE decodes both, so its own reconstruction error cancels), and the latent error there
  relative to the latents' variance; the untrained teacher is the reference point;
- DMD: the distance between the student's two-step samples and the teacher's 50-step CFG samples of
  the same condition (several seeds each), before DMD (the Diffusion Forcing student) and after.

Tiny random-init models trained for minutes on 8 clips: a check that each stage optimises its
objective, never a quality result. The windows come from the training clips.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.real_clips import REAL, write_real_list
from benchmarks.results import RESULTS, machine, report
from lipforcing.data.encode import EncodedBatch, from_records
from lipforcing.data.shards import Reader, epoch_samples, shard_urls
from lipforcing.data.windows import lower_face_mask
from lipforcing.diffusion.samplers import sample_teacher
from lipforcing.metrics.ssim import ssim
from lipforcing.models import build_student, build_teacher, build_vae
from lipforcing.models.vae import mask_to_latent
from pipelines.distill_config import DistillConfig
from pipelines.jobs import resolve_config
from pipelines.stages.student import stream_student

HEADING = "## Learning at toy scale"
COMMAND = "python -m benchmarks.bench_learn --write"
PLOT = RESULTS.with_name("learn_curves.png")
# iterations per stage (2 workers; teacher stages at batch 2 per worker, DMD at 1)
STEPS = {"teacher_base": 1500, "teacher": 100, "student": 600, "dmd": 400}
WINDOWS, SEEDS = 8, 2  # evaluated windows, samples per window and model
LOSSES = {"teacher_base": ["base_loss"], "teacher": ["teacher_loss"], "student": ["loss"], "dmd": ["dmd_loss", "fake_score_loss"]}


def run(module: str, args: list[str], log: Path) -> float:
    """One job as a user runs it (`python -m pipelines.<job> key=value ...`); returns its wall seconds."""
    start = time.perf_counter()
    with log.open("a") as out:
        done = subprocess.run([sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{module} exited with {done.returncode}; see {log}")
    return time.perf_counter() - start


def distill_args(scratch: Path, steps: dict[str, int]) -> list[str]:
    args = [f"output={scratch / 'distill'}", f"latents={scratch / 'latents'}", "dmd.syncnet=", f"teacher.base.steps={steps['teacher_base']}"]
    args += [f"teacher.base.checkpoint_every={steps['teacher_base']}"]
    for stage in ("teacher", "student", "dmd"):
        args += [f"{stage}.train.steps={steps[stage]}", f"{stage}.train.checkpoint_every={steps[stage]}"]
    return args


def train(real: Path, scratch: Path, steps: dict[str, int]) -> dict[str, float]:
    log = scratch / "jobs.log"
    count = write_real_list(scratch / "list.csv", real)
    times = {"clips": float(count)}
    data = ["profile=tiny", f"input={scratch / 'list.csv'}", f"output={scratch / 'data'}", "align.size=64"]
    times["data"] = run("pipelines.data", [*data, "score.enabled=false", "execution.progress=false"], log)
    times["encode"] = run("pipelines.encode", [f"data={scratch / 'data'}", f"output={scratch / 'latents'}", "windows_per_clip=16"], log)
    times["distill"] = run("pipelines.distill", distill_args(scratch, steps), log)
    return times


def loss_curves() -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Each stage's loss histories from its MLflow run."""
    import mlflow

    client = mlflow.tracking.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["lipforcing"], filter_string="tags.stage != ''", output_format="list")
    curves = {}
    for run in runs:
        stage = run.data.tags.get("stage")
        if stage in LOSSES:
            curves[stage] = {
                key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) for key in LOSSES[stage]
            }
    return curves


def plot(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in LOSSES if s in curves]
    figure, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2))
    for axis, stage in zip(axes, stages):
        for key, points in curves[stage].items():
            points = [(step, value) for step, value in points if value > 0]  # log scale
            if not points:
                continue
            steps, values = zip(*points)
            line = axis.plot(steps, values, linewidth=0.6, alpha=0.35)[0]
            width = max(1, len(values) // 30)  # a running mean over ~3 % of the run
            smooth = [sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]
            axis.plot(steps, smooth, color=line.get_color(), linewidth=1.5, label=f"{key} (running mean)")
        axis.set_title(stage)
        axis.set_xlabel("iteration")
        axis.set_yscale("log")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def windows(latents: Path, count: int) -> EncodedBatch:
    """The first `count` cached windows (shard order of seed 0) as one batch."""
    texts = torch.load(latents / "text.pt", weights_only=True)
    records = []
    for sample in epoch_samples(shard_urls(str(latents)), Reader(), 0, 0):
        records.append(torch.load(io.BytesIO(sample["pth"]), weights_only=True))
        if len(records) == count:
            break
    config = resolve_config(DistillConfig, ["profile=tiny"])
    latent_mask = mask_to_latent(lower_face_mask(config.window.size, config.window.mask_box))
    return from_records(records, texts["text"], texts["negative_text"], latent_mask)


class Scorer:
    """Kept-region scores of latent samples against the clean latents of the same windows."""

    def __init__(self, batch: EncodedBatch, config: DistillConfig):
        self.batch = batch
        self.vae = build_vae(config.model)
        self.keep_pixels = lower_face_mask(config.window.size, config.window.mask_box)[0, 0]
        self.keep_latent = batch.cond.mask.expand_as(batch.x0)  # 1 = kept, 0 = mouth
        with torch.no_grad():
            self.reference = self.vae.decode(batch.x0)
        self.variance = float(batch.x0[self.keep_latent.bool()].var())

    @torch.no_grad()
    def scores(self, samples: torch.Tensor) -> dict[str, float]:
        decoded = self.vae.decode(samples).clamp(0, 1)
        kept_error = ((samples - self.batch.x0) ** 2 * self.keep_latent).sum() / self.keep_latent.sum()
        return {
            "kept_ssim": float(ssim(decoded, self.reference.clamp(0, 1), mask=self.keep_pixels).mean()),
            "kept_latent_error": float(kept_error) / self.variance,
        }


def student_samples(model: torch.nn.Module, batch: EncodedBatch, seed: int) -> torch.Tensor:
    """The two-step stream of each window in turn (the streaming cache holds one clip)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad():
        for index in range(len(batch.x0)):
            cond = type(batch.cond)(**{k: None if v is None else v[index : index + 1] for k, v in vars(batch.cond).items()})
            rows.append(stream_student(model, cond, generator))
    return torch.cat(rows)


def teacher_samples(model: torch.nn.Module, batch: EncodedBatch, config: DistillConfig, seed: int) -> torch.Tensor:
    noise = torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(seed))
    cfg = config.model
    with torch.no_grad():
        null = batch.cond.null(batch.negative_text)
        return sample_teacher(model, noise, batch.cond, null, cfg.guidance_scale, cfg.teacher_steps, cfg.shift).latents


def distances(students: list[torch.Tensor], teachers: list[torch.Tensor], mouth: torch.Tensor, variance: float) -> dict[str, object]:
    """Student vs teacher samples of the same conditions, relative to the clean latents' variance:
    the mean over all (student, teacher) sample pairs of the squared distance, and the squared distance
    between the two sample means of each condition (also kept per window), over the mouth region."""
    cells = mouth[0].sum()
    pairs = [((s - t) ** 2 * mouth).sum() / mouth.sum() for s in students for t in teachers]
    gap = (torch.stack(students).mean(0) - torch.stack(teachers).mean(0)) ** 2 * mouth
    per_window = (gap.flatten(1).sum(1) / cells / variance).tolist()
    return {
        "pair_distance": float(sum(pairs) / len(pairs)) / variance,
        "mean_distance": sum(per_window) / len(per_window),
        "per_window": per_window,
    }


def evaluate(scratch: Path) -> dict[str, dict[str, float]]:
    config = resolve_config(DistillConfig, ["profile=tiny"])
    batch = windows(scratch / "latents", WINDOWS)
    scorer = Scorer(batch, config)
    weights = {stage: str(scratch / "distill" / stage / "dit.safetensors") for stage in ("teacher", "student", "dmd")}
    torch.manual_seed(0)
    models = {
        "teacher, untrained (random init)": ("teacher", build_teacher(config.model).eval()),
        "teacher, trained (base + LoRA)": ("teacher", build_teacher(config.model, weights=weights["teacher"]).eval()),
        "student before Diffusion Forcing (teacher weights, causal)": ("student", build_student(config.model, weights=weights["teacher"]).eval()),
        "student after Diffusion Forcing": ("student", build_student(config.model, weights=weights["student"]).eval()),
        "student after DMD": ("student", build_student(config.model, weights=weights["dmd"]).eval()),
    }
    samples = {}
    for name, (kind, model) in models.items():
        draws = [teacher_samples(model, batch, config, seed) if kind == "teacher" else student_samples(model, batch, seed) for seed in range(SEEDS)]
        samples[name] = draws
    results = {}
    mouth = 1 - scorer.keep_latent
    teacher = samples["teacher, trained (base + LoRA)"]
    for name, draws in samples.items():
        per_seed = [scorer.scores(d) for d in draws]
        row = {key: sum(s[key] for s in per_seed) / len(per_seed) for key in per_seed[0]}
        if name.startswith("student after"):
            row.update(distances(draws, teacher, mouth, scorer.variance))
        results[name] = row
    return results


def markdown(results: dict[str, dict[str, float]], times: dict[str, float], steps: dict[str, int], note: str = "") -> str:
    lines = [HEADING, ""]
    if note:
        return "\n".join([*lines, f"Skipped: {note}", ""])
    lines += [
        f"Machine: {machine()}. Command: `{COMMAND}`. One run: jobs {times['data']:.0f} s (data, {times['clips']:.0f} real "
        f"clips) + {times['encode']:.0f} s (encode) + {times['distill']:.0f} s (distill: teacher base {steps['teacher_base']}, "
        f"teacher {steps['teacher']}, student {steps['student']}, DMD {steps['dmd']} iterations, 2 workers, no SyncNet "
        f"reward), then sampling. Tiny profile, random-init models, 64 px, trained on 8 real clips and scored on {WINDOWS} "
        f"windows of them ({SEEDS} samples each): a check that every stage optimises its objective, **not a quality result**.",
        "",
        "| model (same conditions) | kept-region SSIM | kept-region latent error | mouth distance to teacher (pairs / means) |",
        "|---|---|---|---|",
    ]
    for name, row in results.items():
        distance = f"{row['pair_distance']:.3f} / {row['mean_distance']:.3f}" if "pair_distance" in row else "-"
        lines.append(f"| {name} | {row['kept_ssim']:.3f} | {row['kept_latent_error']:.3f} | {distance} |")
    before, after = results["student after Diffusion Forcing"], results["student after DMD"]
    untrained, trained = results["teacher, untrained (random init)"], results["teacher, trained (base + LoRA)"]
    closer = sum(a < b for a, b in zip(after["per_window"], before["per_window"]))
    lines += [
        "",
        f"Kept-region SSIM: teacher {untrained['kept_ssim']:.3f} untrained -> {trained['kept_ssim']:.3f} trained; the "
        f"two-step Diffusion Forcing student {before['kept_ssim']:.3f}. DMD moved the student's samples toward the "
        f"teacher's: mean distance {before['mean_distance']:.3f} -> {after['mean_distance']:.3f} "
        f"({after['mean_distance'] / before['mean_distance']:.2f}x; closer on {closer} of {len(after['per_window'])} "
        f"windows), pairwise {before['pair_distance']:.3f} -> {after['pair_distance']:.3f}.",
        "",
        "- SSIM: decoded sample vs decoded clean latent (the same tiny random VAE decodes both), over the window "
        "centres outside the mouth box; latent error: squared error in the kept latent cells over the clean latents' "
        "variance (1.0 = as far off as the mean).",
        "- Distance to teacher: squared distance in the mouth latent cells between the student's two-step samples and "
        "the trained teacher's 50-step CFG (4.5) samples of the same conditions, relative to the clean latents' variance: "
        "averaged over all sample pairs, and between the per-condition sample means.",
        "",
        f"![loss curves per stage]({PLOT.name})",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the {HEADING!r} section of RESULTS.md")
    parser.add_argument("--real", type=Path, default=REAL, help="folder of real talking-head clips")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's iterations (quick runs)")
    args = parser.parse_args(argv)
    steps = {stage: max(1, round(count * args.scale)) for stage, count in STEPS.items()}
    if not any(args.real.glob("*.mp4")):
        return report(markdown({}, {}, steps, note=f"no real clips (*.mp4) in {args.real}"), HEADING, False)
    with tempfile.TemporaryDirectory(prefix="bench-learn-") as folder:
        scratch = Path(folder)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"
        times = train(args.real, scratch, steps)
        results = evaluate(scratch)
        section = report(markdown(results, times, steps), HEADING, args.write)
        if args.write:
            plot(loss_curves(), PLOT)
    return section


if __name__ == "__main__":
    main()
