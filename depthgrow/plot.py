"""Plots (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np

from depthgrow.frontier import Frontier

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402


def plot_compare(
    logs: dict[str, list[dict[str, Any]]], path: str | Path, *, title: str, frontier: Frontier | None = None
) -> Path:
    """Validation loss against cumulative FLOPs and against step, one line per run; each expansion is
    marked with a dotted line in the run's colour (and its loss just before and after as points). Runs
    named ``fixed-T...`` (the shorter fixed-depth runs of a compare) are thin grey lines, and with a
    ``frontier`` the fixed-depth law is drawn through their final losses, every run's final loss a point."""
    figure, (by_flops, by_step) = plt.subplots(1, 2, figsize=(13, 5))
    colours = iter(f"C{index}" for index in range(len(logs)))
    for name, records in logs.items():
        shorter = name.startswith("fixed-T")
        colour = "grey" if shorter else next(colours)
        style = {"color": colour, "linewidth": 0.8 if shorter else 1.5, "label": None if shorter else name}
        evals = [r for r in records if r["event"] == "eval"]
        spent = [r for r in evals if r["flops"] > 0]  # the step-0 evaluation has no place on a log axis
        by_flops.plot([r["flops"] for r in spent], [r["val_loss"] for r in spent], **style)
        by_step.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], **style)
        if frontier is not None and evals:
            marker = "s" if shorter or name == "fixed" else "*"
            by_flops.scatter([evals[-1]["flops"]], [evals[-1]["val_loss"]], color=colour, marker=marker, s=60, zorder=3)
        for growth in (r for r in records if r["event"] == "growth"):
            label = f"{name}: {growth['from_depth']} -> {growth['to_depth']} layers at step {growth['step']}"
            by_step.axvline(growth["step"], color=colour, linestyle=":", label=label)
            around = [r for r in evals if r.get("phase") and r["step"] == growth["step"]]
            by_flops.scatter([r["flops"] for r in around], [r["val_loss"] for r in around], color=colour, s=12)
    if frontier is not None:
        low, high = min(c for c, _ in frontier.points), max(c for c, _ in frontier.points)
        flops = np.geomspace(low / 2, high * 1.5, 200)
        by_flops.plot(flops, [frontier.law.loss(c) for c in flops], "k--", linewidth=1,
                      label=f"fixed-depth frontier (grey: shorter fixed runs)\n{frontier.law.text()}")  # fmt: skip
    for axes, xlabel in ((by_flops, "cumulative training FLOPs"), (by_step, "step")):
        axes.set_xlabel(xlabel)
        axes.set_ylabel("validation loss (nats/token)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    by_flops.set_xscale("log")
    by_flops.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled minor ticks overlap
    if frontier is not None:  # the end of training, where the runs are compared, not the first steps
        finals = [loss for _, loss in frontier.points]
        by_flops.set_ylim(min(finals) - 0.1 * (max(finals) - min(finals) + 0.1), max(finals) + 0.6)
    return _save(figure, path, title)


def plot_sweep(
    rows: list[dict[str, Any]],
    path: str | Path,
    *,
    title: str,
    x_label: str = "expansion time (fraction of T)",
    tolerance: float | None = None,
) -> Path:
    """Against the swept value, one line per series (e.g. schedule): the final gap to the fixed-depth run,
    and the closest the run came to it after the expansion (mixing means reaching the tolerance)."""
    figure, (gap_axes, near_axes) = plt.subplots(1, 2, figsize=(13, 5))
    for index, series in enumerate(dict.fromkeys(r["series"] for r in rows)):
        points = sorted((r["x"], r["gap_pct"], r["closest_gap_pct"]) for r in rows if r["series"] == series)
        gap_axes.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{index}", label=series)
        near_axes.plot([p[0] for p in points], [p[2] for p in points], "o-", color=f"C{index}", label=series)
    gap_axes.set_ylabel("final validation loss gap to the fixed-depth run (%)")
    near_axes.set_ylabel("smallest gap after the expansion (%)")
    if tolerance is not None:
        near_axes.axhline(100 * tolerance, color="grey", linestyle="--", label=f"mixed: within {tolerance:.0%}")
    for axes in (gap_axes, near_axes):
        axes.axhline(0.0, color="black", linewidth=0.8)
        axes.set_xlabel(x_label)
        if max(r["x"] for r in rows) / min(r["x"] for r in rows) > 10:
            axes.set_xscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return _save(figure, path, title)


def plot_pareto(rows: list[dict[str, Any]], path: str | Path, *, title: str) -> Path:
    """Final validation loss against compute fraction, coloured by series (source depth), with the
    Pareto front of all points, the fixed-depth run included, drawn through them."""
    from depthgrow.analysis import pareto_front

    figure, axes = plt.subplots(figsize=(8, 6))
    for index, series in enumerate(dict.fromkeys(r["series"] for r in rows)):
        points = [r for r in rows if r["series"] == series]
        axes.scatter(
            [r["compute_fraction"] for r in points],
            [r["final_val_loss"] for r in points],
            color=f"C{index}",
            label=series,
        )
        for r in points:
            axes.annotate(f"{r['x']:g}", (r["compute_fraction"], r["final_val_loss"]), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")  # fmt: skip
    baseline = min(r["baseline_val_loss"] for r in rows)
    axes.scatter([1.0], [baseline], color="black", marker="s", label="fixed depth")
    points = [(r["compute_fraction"], r["final_val_loss"]) for r in rows] + [(1.0, baseline)]
    front = [points[i] for i in pareto_front(points)]
    axes.plot([p[0] for p in front], [p[1] for p in front], "k--", linewidth=1, label="Pareto front")
    axes.set_xlabel("training FLOPs (fraction of the fixed-depth run)")
    axes.set_ylabel("final validation loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path, title)


def _save(figure: Any, path: str | Path, title: str) -> Path:
    width_chars = int(figure.get_figwidth() * 11)
    figure.suptitle("\n".join(textwrap.wrap(title, width_chars)), fontsize=11)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_lr(rows: list[dict[str, Any]], path: str | Path, *, title: str) -> Path:
    """Final validation loss against the peak learning rate: each series (solid) and its fixed-depth
    baselines (dashed, square markers; series that share their baselines share one line)."""
    figure, axes = plt.subplots(figsize=(8, 5.5))
    series_names = list(dict.fromkeys(r["series"] for r in rows))
    baselines = {
        series: tuple(sorted({(r["x"], r["baseline_val_loss"]) for r in rows if r["series"] == series}))
        for series in series_names
    }
    shared = len(set(baselines.values())) == 1
    drawn: set[tuple[tuple[float, float], ...]] = set()
    for index, series in enumerate(series_names):
        points = sorted((r["x"], r["final_val_loss"]) for r in rows if r["series"] == series)
        axes.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{index}", label=series)
        if baselines[series] not in drawn:
            label = "fixed depth" if shared else f"fixed depth ({series})"
            colour = "black" if shared else f"C{index}"
            xs, ys = zip(*baselines[series], strict=True)
            axes.plot(xs, ys, "s--", color=colour, label=label)
            drawn.add(baselines[series])
    axes.set_xscale("log")
    axes.set_xlabel("peak learning rate")
    axes.set_ylabel("final validation loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path, title)


def plot_regime(rows: list[dict[str, Any]], path: str | Path, *, title: str, x_label: str) -> Path:
    """The compute multiplier against the swept value (log scale), one line per series; above 1 the
    progressive run beats a fixed-depth run given the same FLOPs. Hollow markers: read outside the
    measured fixed-depth runs."""
    figure, axes = plt.subplots(figsize=(9, 6))
    for index, series in enumerate(dict.fromkeys(r["series"] for r in rows)):
        points = sorted((r["x"], r["compute_multiplier"], r["multiplier_extrapolated"]) for r in rows
                        if r["series"] == series and r["compute_multiplier"] is not None)  # fmt: skip
        if not points:
            continue
        style = "o-" if len(points) > 1 else "o"
        axes.plot([p[0] for p in points], [p[1] for p in points], style, color=f"C{index % 10}", label=series)
        hollow = [p for p in points if p[2]]
        axes.scatter(
            [p[0] for p in hollow], [p[1] for p in hollow], color="white", edgecolor=f"C{index % 10}", zorder=3
        )
    axes.axhline(1.0, color="black", linewidth=0.8, label="worth exactly its FLOPs")
    axes.set_xscale("log", base=2)
    axes.set_xlabel(x_label)
    axes.set_ylabel("compute multiplier (fixed-depth FLOPs to reach the loss / FLOPs spent)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return _save(figure, path, title)


_METHOD_MARKERS = {"fixed": "o", "0 -> L": "*", "1 -> L": "s"}
_METHOD_LINES = {"fixed": "-", "0 -> L": "--", "1 -> L": ":"}


def plot_scaling(
    rows: list[dict[str, Any]], laws: dict[str, dict[str, Frontier | None]], path: str | Path, *, title: str
) -> Path:
    """Left: final loss against FLOPs (log-log), a colour per family and a marker per method, with each
    method's fitted law; right: each progressive run's compute multiplier against its parameters."""
    figure, (by_flops, by_size) = plt.subplots(1, 2, figsize=(13, 5))
    for index, (family, by_method) in enumerate(laws.items()):
        colour = f"C{index}"
        for method, frontier in by_method.items():
            runs = sorted((r for r in rows if (r["family"], r["method"]) == (family, method)), key=lambda r: r["flops"])
            marker, line = _METHOD_MARKERS[method], _METHOD_LINES[method]
            label = f"{family} {method}" + ("" if frontier is None else f" (alpha {frontier.law.alpha:.3f})")
            flops, losses = [r["flops"] for r in runs], [r["final_val_loss"] for r in runs]
            by_flops.scatter(flops, losses, color=colour, marker=marker, s=50 if marker == "*" else 25, label=label)
            if frontier is not None:
                grid = np.geomspace(flops[0] / 1.5, flops[-1] * 1.5, 100)
                by_flops.plot(grid, [frontier.law.loss(c) for c in grid], color=colour, linestyle=line, linewidth=1)
            measured = sorted((r["params"], r["compute_multiplier"]) for r in runs if r["compute_multiplier"])
            if method != "fixed" and measured:
                by_size.plot([p for p, _ in measured], [m for _, m in measured], color=colour, linestyle=line,
                             marker=marker, label=f"{family} {method}")  # fmt: skip
    by_size.axhline(1.0, color="black", linewidth=0.8, label="worth exactly its FLOPs")
    by_flops.set_xscale("log")
    by_flops.set_yscale("log")
    by_flops.set_xlabel("training FLOPs")
    by_flops.set_ylabel("final validation loss (nats/token)")
    by_size.set_xscale("log")
    by_size.set_xlabel("parameters")
    by_size.set_ylabel("compute multiplier on the fixed-depth law")
    for axes in (by_flops, by_size):
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=7)
    return _save(figure, path, title)
