"""Plots (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402


def plot_compare(logs: dict[str, list[dict[str, Any]]], path: str | Path, *, title: str) -> Path:
    """Validation loss against cumulative FLOPs and against step, one line per run; each expansion is
    marked with a dotted line in the run's colour (and its loss just before and after as points)."""
    figure, (by_flops, by_step) = plt.subplots(1, 2, figsize=(13, 5))
    for index, (name, records) in enumerate(logs.items()):
        colour = f"C{index}"
        evals = [r for r in records if r["event"] == "eval"]
        by_flops.plot([r["flops"] for r in evals], [r["val_loss"] for r in evals], color=colour, label=name)
        by_step.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], color=colour, label=name)
        for growth in (r for r in records if r["event"] == "growth"):
            label = f"{name}: {growth['from_depth']} -> {growth['to_depth']} layers at step {growth['step']}"
            by_step.axvline(growth["step"], color=colour, linestyle=":", label=label)
            around = [r for r in evals if r.get("phase") and r["step"] == growth["step"]]
            by_flops.scatter([r["flops"] for r in around], [r["val_loss"] for r in around], color=colour, s=12)
    for axes, xlabel in ((by_flops, "cumulative training FLOPs"), (by_step, "step")):
        axes.set_xlabel(xlabel)
        axes.set_ylabel("validation loss (nats/token)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    by_flops.set_xscale("log")
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
