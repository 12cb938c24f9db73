"""The compute-matched baseline: fixed-depth loss against FLOPs, and what a progressive run is worth on it.

A progressive run that spends a fraction f of the full-length fixed-depth run's FLOPs should be judged
against the honest alternative: a fixed-depth run given the same FLOPs, i.e. trained for f·T steps with
its own complete schedule. Fixed-depth runs of several lengths give points (C, L) of the fixed-depth
frontier; through them we fit

    L(C) = E + A · C^(-alpha)        (E: the loss that more steps of this model cannot beat)

and read off, for a progressive run with final loss L_p after spending C_p FLOPs,

- the **compute-matched loss** L(C_p): where a fixed-depth run of the same FLOPs ends;
- the **compute multiplier** C*(L_p) / C_p with C*(L) = (A / (L - E))^(1/alpha): the FLOPs a fixed-depth
  run needs to reach L_p, over the FLOPs the progressive run spent. Above 1 growth beats training the
  fixed-depth model for less time; the paper's v2 reports 3-5x at scale.

With three fixed points the law passes through all of them; with more, its residuals say how well it
holds. A multiplier whose C* lies outside the measured FLOPs is an extrapolation and is marked as one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_POINTS = 3  # the law has three parameters


@dataclass(frozen=True)
class PowerLaw:
    """L(C) = E + A · (C / scale)^(-alpha); ``scale`` (the largest fitted FLOPs) keeps A readable."""

    E: float
    A: float
    alpha: float
    scale: float

    def loss(self, flops: float) -> float:
        return self.E + self.A * (flops / self.scale) ** -self.alpha

    def flops_for(self, loss: float) -> float:
        """The FLOPs at which the law reaches ``loss`` (infinite at or below E)."""
        if loss <= self.E:
            return math.inf
        return self.scale * (self.A / (loss - self.E)) ** (1.0 / self.alpha)

    def text(self) -> str:
        return f"L(C) = {self.E:.4f} + {self.A:.4f} (C / {self.scale:.3g})^-{self.alpha:.3f}"


@dataclass(frozen=True)
class Frontier:
    """The fixed-depth points (FLOPs, final loss) and the law fitted through them."""

    points: tuple[tuple[float, float], ...]
    law: PowerLaw

    @property
    def residuals(self) -> list[float]:
        """Measured minus fitted loss at each point."""
        return [float(loss - self.law.loss(flops)) for flops, loss in self.points]

    def compute_matched_loss(self, flops: float) -> float:
        return self.law.loss(flops)

    def multiplier(self, flops: float, loss: float) -> float:
        """The FLOPs a fixed-depth run needs to reach ``loss``, over ``flops``."""
        return self.law.flops_for(loss) / flops

    def extrapolated(self, loss: float) -> bool:
        """Whether the FLOPs that reach ``loss`` lie outside the measured points."""
        needed = self.law.flops_for(loss)
        return not min(f for f, _ in self.points) <= needed <= max(f for f, _ in self.points)

    def to_dict(self) -> dict[str, object]:
        return {
            "law": {"E": self.law.E, "A": self.law.A, "alpha": self.law.alpha, "scale": self.law.scale},
            "points": [{"flops": flops, "val_loss": loss} for flops, loss in self.points],
            "residuals": self.residuals,
        }


def fit_frontier(points: Sequence[tuple[float, float]]) -> Frontier | None:
    """The law through fixed-depth points (FLOPs, loss), or None when it cannot be fitted: fewer than three
    distinct FLOPs, or losses that do not fall at every step up in FLOPs (a model that overfits, or noise
    as large as the gains: no loss-versus-compute law to read a multiplier from)."""
    points = tuple(sorted((float(c), float(loss)) for c, loss in points))
    if len({c for c, _ in points}) < MIN_POINTS or not falls_with_compute(points):
        return None
    flops = np.array([c for c, _ in points])
    losses = np.array([loss for _, loss in points])
    scale = float(flops.max())
    x = np.log(flops / scale)

    def fit_given(E: float) -> tuple[float, float, float]:
        """Least squares of log(L - E) on log C for a fixed E; (A, alpha, squared error in loss)."""
        slope, intercept = np.polyfit(x, np.log(losses - E), 1)
        predicted = E + np.exp(intercept + slope * x)
        return float(np.exp(intercept)), float(-slope), float(((predicted - losses) ** 2).sum())

    # E lies in [0, every measured loss); search it on a grid, then refine around the best grid point
    top = float(losses.min())
    grid = top * (1.0 - np.geomspace(1e-6, 1.0, 400))
    errors = [fit_given(E)[2] for E in grid]
    best = int(np.argmin(errors))
    low, high = grid[min(best + 1, len(grid) - 1)], grid[max(best - 1, 0)]
    for _ in range(100):  # golden-section search on the bracket
        a = high - 0.618 * (high - low)
        b = low + 0.618 * (high - low)
        if fit_given(a)[2] < fit_given(b)[2]:
            high = b
        else:
            low = a
    E = (low + high) / 2
    A, alpha, _ = fit_given(E)
    if not (alpha > 0 and A > 0 and math.isfinite(alpha)):
        return None
    return Frontier(points=points, law=PowerLaw(E=E, A=A, alpha=alpha, scale=scale))


def falls_with_compute(points: Sequence[tuple[float, float]]) -> bool:
    """Whether the loss falls from each fixed-depth run to the next larger one."""
    ordered = sorted(points)
    return all(later[1] < earlier[1] for earlier, later in itertools.pairwise(ordered))


def ladder_fractions(progressive_fractions: Sequence[float]) -> list[float]:
    """The lengths (fractions of T) of the fixed-depth runs that trace the frontier for progressive runs of
    these compute fractions: one at each of them (the compute-matched runs themselves), one at half the
    smallest (so that a run worth less than its FLOPs is read inside the measured range), and T itself."""
    fractions = {round(f, 4) for f in progressive_fractions if 0 < f < 1}
    if fractions:
        fractions.add(round(min(fractions) / 2, 4))
    return sorted(fractions | {1.0})
