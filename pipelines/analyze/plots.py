"""The analysis figures (PNG bytes, matplotlib's Agg canvas): the per-step curves with the chosen
band, and the two-call grid's heat maps with the landing plateau and chosen step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lipforcing.analysis.recipe import Landing, SyncBand
from pipelines.compare_plots import figure_png

# The released recipe, read off the 14B teacher by the paper's analysis on its 50-step schedule: drawn
# dashed for comparison, only on that schedule and inside the plotted range.
RELEASED_WINDOW, RELEASED_LANDING, RELEASED_STEPS = (20, 40), 30, 50


def trajectory_figure(curves: dict[str, Any], band: SyncBand | None) -> bytes:
    """Fidelity, Sync-C and CFG's efficiency per ODE step, plain vs CFG; the derived band shaded and
    the released one dashed."""
    steps = curves["steps"]
    figure = Figure(figsize=(15, 3.8))
    panels = (("fidelity", curves["fidelity_metric"].split(" ")[0] + " (lower is better)"), ("sync_c", "Sync-C"))
    for index, (metric, title) in enumerate(panels, start=1):
        axis = figure.add_subplot(1, 3, index)
        axis.plot(steps, curves["plain"][metric], label="no CFG")
        axis.plot(steps, curves["guided"][metric], label="CFG")
        if metric == "sync_c":
            axis.axhline(curves["source"]["sync_c"], color="grey", linestyle=":", label="source clips")
        axis.set_title(title)
        axis.set_xlabel("teacher ODE step j")
        axis.legend(fontsize=8)
    axis = figure.add_subplot(1, 3, 3)
    if band is not None:
        axis.plot(steps, band.efficiency, color="black")
        axis.set_title("CFG: Sync-C gained per fidelity lost")
    else:
        axis.set_title("CFG never raised Sync-C: no band")
    axis.set_xlabel("teacher ODE step j")
    released = len(steps) == RELEASED_STEPS
    for axis in figure.axes:
        if band is not None:
            axis.axvspan(band.first, band.last, color="tab:green", alpha=0.15)
        for step in RELEASED_WINDOW if released else ():
            axis.axvline(step, color="grey", linestyle="--", linewidth=0.8)
    figure.suptitle("shaded: the derived band" + ("; dashed: the released window (steps 20..40)" if released else ""), fontsize=9)
    return figure_png(figure)


def factorial_figure(curves: dict[str, Any], scales: Sequence[float], landing_steps: Sequence[int], landing: Landing) -> bytes:
    """Heat maps over (s0, s1) x j1 of Sync-C, fidelity and the landing score: the plateau boxed, the
    chosen step starred, the released j1 = 30 dashed."""
    schedules = [(s0, s1) for s0 in scales for s1 in scales]
    sync = np.array([[curves["grid"][f"{s0:g}/{s1:g}/{j}"]["sync_c"] for j in landing_steps] for s0, s1 in schedules])
    fidelity = np.array([[curves["grid"][f"{s0:g}/{s1:g}/{j}"]["fidelity"] for j in landing_steps] for s0, s1 in schedules])
    score = np.array([landing.scores[s] for s in schedules])
    figure = Figure(figsize=(15, 1.2 + 0.6 * len(schedules) * 3))
    best_row = schedules.index(landing.schedule)
    axis = None
    for index, (values, title) in enumerate(((sync, "Sync-C"), (fidelity, "fidelity (lower is better)"), (score, "landing score")), start=1):
        axis = figure.add_subplot(3, 1, index)
        image = axis.imshow(values, aspect="auto", cmap="viridis", extent=(landing_steps[0] - 0.5, landing_steps[-1] + 0.5, len(schedules) - 0.5, -0.5))
        figure.colorbar(image, ax=axis)
        axis.set_yticks(range(len(schedules)), [f"s0={a:g}, s1={b:g}" for a, b in schedules])
        axis.set_title(title)
        axis.axvspan(landing.first - 0.5, landing.last + 0.5, ymin=1 - (best_row + 1) / len(schedules),
                     ymax=1 - best_row / len(schedules), fill=False, edgecolor="white", linewidth=1.5)  # fmt: skip
        axis.plot([landing.chosen], [best_row], marker="*", color="red", markersize=12)
        if len(curves["steps"]) == RELEASED_STEPS and landing_steps[0] <= RELEASED_LANDING <= landing_steps[-1]:
            axis.axvline(RELEASED_LANDING, color="white", linestyle="--", linewidth=0.8)
    axis.set_xlabel("landing step j1")
    return figure_png(figure)
