"""Extrapolate the horizon experiment: at what run length would a progressive run mix?

    depthgrow experiment horizon --full --out results      # the runs (about an hour on 2 CPU cores)
    python benchmarks/horizon_fit.py results/horizon/summary.json

Reads the experiment's summary (progressive runs grown at 0.8 T and their fixed-depth baselines, for
several T) and prints:

- per source depth, the gap's power law in T (a least-squares line in log-log) and the T at which it
  would fall to 1 % and 0.5 %; and the same T if the run ends as a fixed-depth run given its FLOPs does;
- the fixed-depth runs' loss law L(T) = E + A T^-alpha and, for each progressive run, the loss of a
  fixed-depth run given the same FLOPs (a shorter run, T' = compute fraction x T, read off the law):
  whether growing beat simply training the full-depth model for fewer steps.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from depthgrow.frontier import PowerLaw, fit_frontier


def gap_law(lengths: list[float], gaps: list[float]) -> tuple[float, float]:
    """(a, b) of gap = a T^-b, fitted on log-log."""
    slope, intercept = np.polyfit(np.log(lengths), np.log(gaps), 1)
    return float(np.exp(intercept)), float(-slope)


def _law_reach(law: PowerLaw, fraction: float, target_pct: float) -> float:
    """The T at which L(fraction x T) / L(T) - 1 falls to ``target_pct`` under the fixed-depth law: the gap
    of a run that ends where a fixed-depth run given its FLOPs ends (bisection on log T)."""

    def gap(t: float) -> float:
        return 100 * (law.loss(fraction * t) / law.loss(t) - 1)

    low, high = 1.0, 1e15
    for _ in range(200):
        middle = (low * high) ** 0.5
        low, high = (middle, high) if gap(middle) > target_pct else (low, middle)
    return high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path, help="results/horizon/summary.json")
    rows = json.loads(parser.parse_args().summary.read_text())

    baselines = sorted({(row["x"], row["baseline_val_loss"]) for row in rows})
    frontier = fit_frontier(baselines)  # the law in T: at a fixed depth FLOPs are proportional to T
    if frontier is None:
        raise SystemExit("the fixed-depth losses do not follow a falling power law: nothing to extrapolate")
    law = frontier.law
    print(f"fixed depth: {law.text().replace('C', 'T')}")
    for t, loss in baselines:
        print(f"  T={t:>6}: measured {loss:.4f}, law {law.loss(t):.4f}")

    by_source = defaultdict(list)
    for row in rows:
        by_source[row["source_depth"]].append(row)
    for source, runs in sorted(by_source.items()):
        runs.sort(key=lambda row: row["x"])
        a, b = gap_law([row["x"] for row in runs], [row["gap_pct"] for row in runs])
        if b > 0:
            reach = {target: (a / target) ** (1 / b) for target in (1.0, 0.5)}
            print(
                f"\nsource {source}: gap = {a:.3g} T^-{b:.3f} %; 1 % at T ~ {reach[1.0]:,.0f}, "
                f"0.5 % at T ~ {reach[0.5]:,.0f} (steps after the expansion: 0.2 T)"
            )
        else:  # a gap that grows with T never reaches a target: nothing to extrapolate
            print(f"\nsource {source}: gap = {a:.3g} T^{-b:.3f} %: it grows with T, so it reaches no target")
        fraction = runs[0]["compute_fraction"]
        by_law = {target: _law_reach(law, fraction, target) for target in (1.0, 0.5)}
        print(
            f"  if the run ends as a fixed-depth run of the same FLOPs: 1 % at T ~ {by_law[1.0]:,.0f}, "
            f"0.5 % at T ~ {by_law[0.5]:,.0f}"
        )
        print(f"  {'T':>6} {'gap %':>7} {'FLOPs':>7} {'progressive':>11} {'fixed, same FLOPs':>17} {'difference':>10}")
        for row in runs:
            matched = law.loss(row["compute_fraction"] * row["x"])
            loss, fraction = row["final_val_loss"], row["compute_fraction"]
            print(
                f"  {row['x']:>6} {row['gap_pct']:>+7.2f} {fraction:>7.1%} {loss:>11.4f} "
                f"{matched:>17.4f} {100 * (loss / matched - 1):>+9.2f}%"
            )


if __name__ == "__main__":
    main()
