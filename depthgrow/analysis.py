"""Reading results: mixing time after an expansion, and the loss-versus-compute Pareto front."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_MIX_TOLERANCE = 0.01  # "mixed" = validation loss within 1 % of the baseline's at the same step


def eval_curve(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, validation loss) of a run, one point per evaluated step: where a step was evaluated several
    times (before and after an expansion) the last, i.e. the model that trains on from there."""
    last = {r["step"]: r["val_loss"] for r in records if r["event"] == "eval"}
    return sorted(last.items())


def last_growth_step(records: list[dict[str, Any]]) -> int | None:
    steps = [r["step"] for r in records if r["event"] == "growth"]
    return steps[-1] if steps else None


def mixing_time(
    curve: Sequence[tuple[int, float]],
    reference: Sequence[tuple[int, float]],
    growth_step: int,
    tolerance: float = DEFAULT_MIX_TOLERANCE,
) -> int | None:
    """Steps after ``growth_step`` until ``curve`` first comes within ``tolerance`` (relative) of
    ``reference`` at the same step: the paper's mixing, measured. None if it never does.

    Only steps evaluated in both curves count, so give both runs the same ``eval_every``.
    """
    reference_at = dict(reference)
    for step, loss in sorted(curve):
        if step >= growth_step and step in reference_at and loss <= reference_at[step] * (1.0 + tolerance):
            return step - growth_step
    return None


def closest_gap(
    curve: Sequence[tuple[int, float]], reference: Sequence[tuple[int, float]], growth_step: int
) -> float | None:
    """The smallest relative gap (percent) to ``reference`` at any step evaluated in both from
    ``growth_step`` on: how near the run came to mixing. None if no step is shared."""
    reference_at = dict(reference)
    gaps = [
        100.0 * (loss / reference_at[step] - 1.0)
        for step, loss in curve
        if step >= growth_step and step in reference_at
    ]
    return min(gaps) if gaps else None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, loss) that no other point beats on both, sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_loss = [], float("inf")
    for index in order:
        if points[index][1] < best_loss:
            front.append(index)
            best_loss = points[index][1]
    return front
