"""`make analyze`: the teacher-trajectory analysis of a teacher, and the distillation recipe it implies.

    python -m pipelines.analyze teacher_weights=s3://bucket/teacher/dit.safetensors data=s3://bucket/heldout

For each held-out clip (Ray tasks, on GPU workers when the cluster has them): the teacher's full
shifted ODE from one noise with and without CFG, every step's x0 prediction decoded (TAE, or the VAE
with decoder=vae) and scored against the source (mouth-region LPIPS, or mouth-region L1 without LPIPS
weights, labelled) and its audio (Sync-C / Sync-D); then the two-call Euler grid over (s0, s1) and the
landing step j1, scored the same way. The driver averages the clips and applies the rules of
lipforcing/analysis/recipe.py: the sync band becomes `dmd.window_steps`, the chosen landing step the
student's second timestep. Written to <output>: curves.json, recipe.yaml (a `make distill config=`
fragment), evidence.json (the numbers it was read from), report.md, plots/; all logged to an MLflow
run `analyze`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import replace
from typing import Any

import numpy as np
import yaml

from lipforcing import storage
from lipforcing.analysis.recipe import (
    Landing,
    SyncBand,
    landing_plateau,
    landing_timestep,
    recipe_fragment,
    recipe_yaml,
    sync_band,
)
from lipforcing.config import ConfigError
from lipforcing.data.shards import Reader, decode_clip, epoch_samples
from lipforcing.diffusion.schedules import shifted_timesteps
from pipelines.analyze.config import AnalyzeConfig, teacher_location, validate
from pipelines.analyze.plots import factorial_figure, trajectory_figure
from pipelines.analyze.worker import analyze_clips, grid_key
from pipelines.evaluate.clips import EvalClip, heldout_shards, prepare_clip

log = logging.getLogger("lipforcing.analyze")
RANDOM_TEACHER = "random-init tiny teacher (no trained teacher found): checks the code path, not a recipe"
METRICS = ("fidelity", "sync_c", "sync_d")


def analyze(config: AnalyzeConfig) -> int:
    """The job: clips on Ray workers, curves and recipe on the driver, everything into MLflow."""
    import mlflow

    from pipelines import tracking
    from pipelines.ray_cluster import init_ray

    validate(config)
    shards = heldout_shards(config.data)
    teacher = teacher_location(config)
    clips = read_clips(shards, config)
    if not clips:
        raise ConfigError(f"config key 'data' is {config.data!r}, which holds no clip of at least 9 frames with audio")
    init_ray()
    if config.device == "cuda" and not ray_gpus():
        raise ConfigError("config key 'device' is 'cuda' but the Ray cluster has no GPU; allowed values: 'auto', 'cpu'")
    with tracking.start_run("analyze", config=config, tags={"job": "analyze"}) as run:
        # every weights file as something each worker node can read (never a path on the driver's disk)
        syncnet = tracking.resolve_model_for_workers(config.syncnet_weights, config.output, "syncnet_weights")
        label = teacher or RANDOM_TEACHER
        if teacher:
            teacher = tracking.resolve_model_for_workers(teacher, config.output, "teacher_weights")
        if config.lpips_weights:
            config = replace(config, lpips_weights=tracking.resolve_model_for_workers(config.lpips_weights, config.output, "lpips_weights"))
        if not teacher:
            log.warning("%s", RANDOM_TEACHER)
        results = run_clips(config, teacher, syncnet, clips)
        curves = average(results, config)
        band, landing = derive(curves, config)
        fragment = recipe_fragment(band, landing, config.model.teacher_steps, config.model.shift)
        evidence = evidence_of(curves, band, landing, config, label, run.info.run_id)
        significance = evidence["band_significance"]
        if significance and significance["significant"] is False:
            log.warning("CFG's Sync-C gain at the band's peak (step %d: %.4g) is within 2 standard errors (%.4g) of "
                        "zero over the clips: the band is read from noise", significance["step"],
                        significance["gain"], significance["standard_error"])  # fmt: skip
        mlflow.set_tags({"teacher": label, "random_init_teacher": str(not teacher).lower(),
                         "fidelity_metric": curves["fidelity_metric"], "syncnet": config.syncnet_weights,
                         "syncnet_location": syncnet})  # fmt: skip
        log_curves(curves, band, landing)
        with tempfile.TemporaryDirectory(prefix="lipforcing-analyze-") as folder:
            write_outputs(folder, curves, fragment, evidence, band, landing, config)
            mlflow.log_artifacts(folder)
            storage.upload_folder(folder, config.output)
    recipe = storage.join(config.output, "recipe.yaml")
    log.info("%s", summary(band, landing, curves, config))
    log.info("recipe: %s  (make distill config=%s ARGS=\"output=<a fresh folder>\")", recipe, recipe)
    return 0


def read_clips(shards: list[str], config: AnalyzeConfig) -> list[EvalClip]:
    """Up to `config.clips` held-out clips in the seed's shard order, cut to `max_frames`."""
    clips = []
    for sample in epoch_samples(shards, Reader(), seed=config.seed, epoch=0):
        if len(clips) >= config.clips:
            break
        clip = prepare_clip(decode_clip(sample), config.window.size, 9, config.max_frames)
        if isinstance(clip, str):
            log.info("skipping %s: %s", sample["__key__"], clip)
            continue
        clips.append(clip)
    return clips


def run_clips(config: AnalyzeConfig, teacher: str, syncnet: str, clips: list[EvalClip]) -> list[dict[str, Any]]:
    """One Ray task per worker slot (a GPU each when the cluster has GPUs), the clips dealt round-robin."""
    import ray

    gpus = ray_gpus() if config.device != "cpu" else 0
    slots = max(1, min(len(clips), gpus or int(ray.cluster_resources().get("CPU", 1))))
    task = ray.remote(analyze_clips).options(num_gpus=1, num_cpus=1) if gpus else ray.remote(analyze_clips).options(num_cpus=1)
    log.info("%d clips on %d %s task(s)", len(clips), slots, "GPU" if gpus else "CPU")
    numbered = list(enumerate(clips))  # a clip's noise seed is seed + its index, wherever it runs
    shares = [numbered[i::slots] for i in range(slots)]
    done = [row for rows in ray.get([task.remote(config, teacher, syncnet, share) for share in shares]) for row in rows]
    return sorted(done, key=lambda row: row["index"])


def ray_gpus() -> int:
    """GPUs in the Ray cluster (its workers', not this driver's)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def average(results: list[dict[str, Any]], config: AnalyzeConfig) -> dict[str, Any]:
    """Clip means of every curve, with the schedule's nodes and the clips themselves."""
    def mean(rows_of_clips: list[list[dict[str, float]]]) -> dict[str, list[float]]:
        return {m: np.mean([[row[m] for row in rows] for rows in rows_of_clips], axis=0).tolist() for m in METRICS}

    cells = list(results[0]["grid"])
    grid_means = mean([[r["grid"][c] for c in cells] for r in results])
    nodes = shifted_timesteps(config.model.teacher_steps, config.model.shift)
    return {
        "clips": [r["key"] for r in results],
        "fidelity_metric": ("mouth_lpips" if config.lpips_weights else "mouth_l1 (LPIPS fallback: lpips_weights is empty)"),
        "steps": list(range(config.model.teacher_steps)),
        "timesteps": [round(float(t), 4) for t in nodes[: config.model.teacher_steps]],
        "plain": mean([r["plain"] for r in results]),
        "guided": mean([r["guided"] for r in results]),
        "grid": {c: {m: grid_means[m][i] for m in METRICS} for i, c in enumerate(cells)},
        "source": {m: float(np.mean([r["source"][m] for r in results])) for m in ("sync_c", "sync_d")},
        "per_clip": results,
    }


def grid_curves(curves: dict[str, Any], config: AnalyzeConfig, metric: str) -> dict[tuple[float, float], list[float]]:
    """(s0, s1) -> the metric along the landing steps."""
    return {
        (s0, s1): [curves["grid"][grid_key(s0, s1, j1)][metric] for j1 in config.landing_range()]
        for s0 in config.scales
        for s1 in config.scales
    }


def derive(curves: dict[str, Any], config: AnalyzeConfig) -> tuple[SyncBand | None, Landing]:
    """The recipe's two choices, by the rules in lipforcing/analysis/recipe.py."""
    guided, plain, rule = curves["guided"], curves["plain"], config.band
    band = sync_band(guided["sync_c"], plain["sync_c"], guided["fidelity"], plain["fidelity"], rule.smooth, rule.keep, rule.cost_floor)
    landing = landing_plateau(grid_curves(curves, config, "sync_c"), grid_curves(curves, config, "fidelity"),
                              config.landing_range(), config.landing.balance, config.landing.smooth, config.landing.tolerance)  # fmt: skip
    return band, landing


def evidence_of(curves: dict[str, Any], band: SyncBand | None, landing: Landing, config: AnalyzeConfig,
                teacher: str, run_id: str) -> dict[str, Any]:  # fmt: skip
    """What the recipe was read from: the rules, the averaged curves at the chosen points, the run."""
    steps, shift = config.model.teacher_steps, config.model.shift
    return {
        "teacher": teacher,
        "profile": config.profile,
        "data": config.data,
        "clips": curves["clips"],
        "fidelity_metric": curves["fidelity_metric"],
        "syncnet": config.syncnet_weights,
        "teacher_steps": steps,
        "shift": shift,
        "decoder": config.decoder,
        "mlflow_run_id": run_id,
        "band_rule": vars(config.band),
        "landing_rule": vars(config.landing),
        "band": None if band is None else {
            "window_steps": [band.first, band.last],
            "window_timesteps": [landing_timestep(band.last, steps, shift), landing_timestep(band.first, steps, shift)],
            "peak_step": band.peak,
            "efficiency": [round(float(e), 6) for e in band.efficiency],
        },
        "band_note": "" if band is not None else "CFG never raised Sync-C along the trajectory: no band, dmd.window_steps left as configured",
        "band_significance": None if band is None else gain_significance(curves["per_clip"], band.peak),
        "landing": {
            "schedule": {"s0": landing.schedule[0], "s1": landing.schedule[1]},
            "plateau": [landing.first, landing.last],
            "chosen_step": landing.chosen,
            "student_timesteps": recipe_fragment(None, landing, steps, shift)["model"]["student_timesteps"],
            "scores": {f"{s0:g}/{s1:g}": [round(float(v), 6) for v in row] for (s0, s1), row in landing.scores.items()},
            "landing_steps": config.landing_range(),
        },
        "curves": {k: curves[k] for k in ("plain", "guided", "source")},
    }


def gain_significance(per_clip: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """Whether CFG's Sync-C gain at the band's peak step stands out of the clip-to-clip spread (mean >
    2 standard errors): a teacher that ignores its audio (a random-init one) gives a band read from noise."""
    gains = np.array([clip["guided"][step]["sync_c"] - clip["plain"][step]["sync_c"] for clip in per_clip])
    if len(gains) < 2:
        return {"step": step, "gain": float(gains[0]), "standard_error": None, "significant": None,
                "note": "one clip: no spread to compare the gain with"}  # fmt: skip
    error = float(gains.std(ddof=1) / np.sqrt(len(gains)))
    return {"step": step, "gain": float(gains.mean()), "standard_error": error, "significant": bool(gains.mean() > 2 * error)}


def log_curves(curves: dict[str, Any], band: SyncBand | None, landing: Landing) -> None:
    """Per-step and per-landing-step curves as MLflow metrics (step = ODE step or j1), and the recipe."""
    from pipelines import tracking

    for j in curves["steps"]:
        values = {f"{run}/{m}": curves[run][m][j] for run in ("plain", "guided") for m in METRICS}
        if band is not None:
            values["band/efficiency"] = float(band.efficiency[j])
        tracking.log_metrics(values, step=j)
    for key, row in curves["grid"].items():
        s0, s1, j1 = key.split("/")
        tracking.log_metrics({f"grid/s0_{s0}_s1_{s1}/{m}": row[m] for m in METRICS}, step=int(j1))
    summary_metrics = {"recipe/landing_step": landing.chosen, "recipe/plateau_first": landing.first, "recipe/plateau_last": landing.last}
    if band is not None:
        summary_metrics.update({"recipe/window_first": band.first, "recipe/window_last": band.last})
    tracking.log_metrics(summary_metrics)


def write_outputs(folder: str, curves: dict[str, Any], fragment: dict, evidence: dict[str, Any], band: SyncBand | None,
                  landing: Landing, config: AnalyzeConfig) -> None:  # fmt: skip
    """curves.json, recipe.yaml, evidence.json, plots/*.png and report.md into `folder`."""
    os.makedirs(os.path.join(folder, "plots"))
    with open(os.path.join(folder, "curves.json"), "w") as handle:
        json.dump(curves, handle, indent=1)
    with open(os.path.join(folder, "evidence.json"), "w") as handle:
        json.dump(evidence, handle, indent=1)
    notes = [
        f"Derived by `make analyze` (MLflow run {evidence['mlflow_run_id']}) from {len(curves['clips'])} held-out clip(s) of {config.data}",
        f"teacher: {evidence['teacher']}",
        f"fidelity: {curves['fidelity_metric']}",
        "the numbers behind it: evidence.json beside this file. Use: make distill config=<this file> "
        "ARGS=\"output=<a fresh folder>\" (distill skips stages already done in an output)",
    ]
    with open(os.path.join(folder, "recipe.yaml"), "w") as handle:
        handle.write(recipe_yaml(fragment, notes))
    figures = {
        "trajectory.png": trajectory_figure(curves, band),
        "factorial.png": factorial_figure(curves, config.scales, config.landing_range(), landing),
    }
    for name, png in figures.items():
        with open(os.path.join(folder, "plots", name), "wb") as handle:
            handle.write(png)
    with open(os.path.join(folder, "report.md"), "w") as handle:
        handle.write(render_report(curves, fragment, evidence, band, landing, config))


def summary(band: SyncBand | None, landing: Landing, curves: dict[str, Any], config: AnalyzeConfig) -> str:
    steps, shift = config.model.teacher_steps, config.model.shift
    window = "none (CFG never raised Sync-C)" if band is None else (
        f"ODE steps {band.first}..{band.last} (t {landing_timestep(band.last, steps, shift)}..{landing_timestep(band.first, steps, shift)})")  # fmt: skip
    return (f"{len(curves['clips'])} clip(s); sync band {window}; landing plateau j1 {landing.first}..{landing.last} "
            f"with s0={landing.schedule[0]:g}, s1={landing.schedule[1]:g}; chosen j1={landing.chosen} "
            f"(t={landing_timestep(landing.chosen, steps, shift)}); fidelity: {curves['fidelity_metric']}")  # fmt: skip


def render_report(curves: dict[str, Any], fragment: dict, evidence: dict[str, Any], band: SyncBand | None,
                  landing: Landing, config: AnalyzeConfig) -> str:  # fmt: skip
    """The Markdown report: what was analysed, the recipe, the curves at a glance and the plots."""
    lines = ["# Teacher-trajectory analysis", ""]
    if evidence["teacher"].startswith("random-init"):
        lines += [f"**{evidence['teacher']}.**", ""]
    lines += [
        f"- teacher: {evidence['teacher']}",
        f"- clips: {len(curves['clips'])} held-out ({config.data}): {', '.join(curves['clips'])}",
        f"- fidelity: {curves['fidelity_metric']} (lower is better); sync: Sync-C / Sync-D with {config.syncnet_weights}",
        f"- source clips: Sync-C {curves['source']['sync_c']:.3f}, Sync-D {curves['source']['sync_d']:.3f}",
        f"- CFG's Sync-C gain at the band's peak against the clip spread: {evidence['band_significance']}",
        f"- {summary(band, landing, curves, config)}",
        "",
        "## recipe.yaml",
        "",
        "```yaml",
        yaml.safe_dump(fragment, sort_keys=False).rstrip(),
        "```",
        "",
        "## Per ODE step (every 5th)",
        "",
        "| step | t | fidelity plain | fidelity CFG | Sync-C plain | Sync-C CFG | efficiency |",
        "|---|---|---|---|---|---|---|",
    ]
    for j in curves["steps"][::5]:
        efficiency = f"{band.efficiency[j]:.3g}" if band is not None else "-"
        lines.append(f"| {j} | {curves['timesteps'][j]:.3f} | {curves['plain']['fidelity'][j]:.4f} | {curves['guided']['fidelity'][j]:.4f} "
                     f"| {curves['plain']['sync_c'][j]:.3f} | {curves['guided']['sync_c'][j]:.3f} | {efficiency} |")  # fmt: skip
    lines += ["", "## Two-call grid: score along j1 (normalised Sync-C - balance x normalised fidelity)", "",
              "| s0 / s1 | " + " | ".join(str(j) for j in config.landing_range()) + " |",
              "|---|" + "---|" * len(config.landing_range())]  # fmt: skip
    for (s0, s1), row in landing.scores.items():
        lines.append(f"| {s0:g} / {s1:g} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    lines += ["", "![trajectory](plots/trajectory.png)", "", "![factorial](plots/factorial.png)", ""]
    return "\n".join(lines)
