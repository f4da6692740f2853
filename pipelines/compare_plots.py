"""The figures of `make compare`: loss curves per training stage and the Sync-C frontier of eval runs.

Each function returns PNG bytes (matplotlib's Agg canvas, no pyplot state), so the report can both
embed them in its HTML and write them beside its Markdown.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# The paper's operating points on HDTF (33 test clips; its main table): (name, Sync-C, FVD, SSIM).
PAPER_POINTS = (("Lip Forcing (1.3B)", 6.88, 118.86, 0.919), ("Lip Forcing (14B)", 7.59, 107.88, 0.938))
PAPER_GROUND_TRUTH_SYNC_C = 7.95
TINY_LABEL = "tiny profile, random-init: not a quality result"

Curve = Sequence[tuple[int, float]]  # (step, value), in step order


@dataclass(frozen=True)
class FrontierPoint:
    label: str  # what the plot writes next to the point
    sync_c: float
    x: float  # FVD or SSIM, as the figure's axis says
    tiny: bool  # a tiny-profile run: plotted apart, never read as a quality result


def pareto_optimal(points: Sequence[tuple[float, float]], lower_x_is_better: bool) -> list[bool]:
    """For each (Sync-C, x) point: whether no other point dominates it, i.e. is at least as good on
    both axes and strictly better on one. Higher Sync-C is better; x is FVD (lower is better) or SSIM
    (higher is better). Equal points do not dominate each other."""
    sign = -1.0 if lower_x_is_better else 1.0
    scores = [(sync_c, sign * x) for sync_c, x in points]  # both to maximise
    return [not any(o[0] >= p[0] and o[1] >= p[1] and o != p for o in scores) for p in scores]


def figure_png(figure: Figure) -> bytes:
    """A matplotlib figure as PNG bytes (no display needed): the plots of compare and analyze."""
    FigureCanvasAgg(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def loss_figure(stage: str, curves: Mapping[str, Mapping[str, Curve]]) -> bytes:
    """One stage's figure: an axis per loss key, a line per run. `curves`: key -> run label -> curve."""
    figure = Figure(figsize=(5.5 * len(curves), 3.6))
    for index, (key, runs) in enumerate(curves.items(), start=1):
        axis = figure.add_subplot(1, len(curves), index)
        for label, points in runs.items():
            steps, values = zip(*points)
            axis.plot(steps, values, linewidth=1.2, marker="." if len(points) < 30 else None, label=label)
        if all(value > 0 for points in runs.values() for _, value in points):
            axis.set_yscale("log")
        axis.set_title(f"{stage}: {key}")
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return figure_png(figure)


def frontier_figure(points: Sequence[FrontierPoint], optimal: Sequence[bool], axis: Literal["fvd", "ssim"]) -> bytes:
    """Sync-C against FVD (or SSIM) of the eval runs, their Pareto frontier, and the paper's points."""
    figure = Figure(figsize=(7.5, 5))
    plot = figure.add_subplot()
    for index, (name, sync_c, fvd, ssim) in enumerate(PAPER_POINTS):
        x = fvd if axis == "fvd" else ssim
        plot.scatter(x, sync_c, marker="*", s=160, color="black", zorder=3, label=None if index else "the paper (HDTF)")
        plot.annotate(name, (x, sync_c), fontsize=7, xytext=(5, 5), textcoords="offset points")
    plot.axhline(PAPER_GROUND_TRUTH_SYNC_C, color="grey", linestyle=":", label="ground truth Sync-C, paper (HDTF)")
    for tiny in (False, True):
        chosen = [p for p in points if p.tiny == tiny]
        if chosen:
            style = {"facecolors": "none", "edgecolors": "grey"} if tiny else {"color": "tab:blue"}
            plot.scatter([p.x for p in chosen], [p.sync_c for p in chosen], s=40, zorder=4,
                         label=TINY_LABEL if tiny else "eval runs", **style)  # fmt: skip
    for point in points:
        plot.annotate(point.label, (point.x, point.sync_c), fontsize=7, xytext=(4, -10), textcoords="offset points")
    front = sorted((p.x, p.sync_c) for p, best in zip(points, optimal) if best)
    if front:
        plot.plot(*zip(*front), color="tab:red", linestyle="--", marker="o", markerfacecolor="none",
                  markersize=11, zorder=5, label="Pareto frontier of the runs")  # fmt: skip
    better = "lower is better" if axis == "fvd" else "higher is better"
    plot.set_xlabel(f"{axis.upper()} ({better})")
    plot.set_ylabel("Sync-C (higher is better)")
    plot.grid(alpha=0.3)
    plot.legend(fontsize=7, loc="best")
    return figure_png(figure)
