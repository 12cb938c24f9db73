"""The paper's v2 scaling laws as an experiment: ``depthgrow experiment scaling``.

A ladder of model sizes (the base preset at several widths, depth and vocabulary kept), each trained on a
fixed number of tokens per parameter (the paper: 50 for dense models, 100 for MoE), at fixed depth and
grown from zero and from one layer at 0.8 T. Per family and method, the final losses against the FLOPs
spent are fitted by ``L(C) = E + A C^-alpha``; each progressive run's compute multiplier is read on the
fixed-depth law of its family (the FLOPs a fixed-depth model of this ladder needs to reach its loss, over
the FLOPs it spent), and its trend with size is the slope of log2(multiplier) on log2(parameters).

Runs live in the experiments' store and are reused; a ladder needs at most ``MAX_EPOCHS`` passes over
the training data at its largest size, else it is refused before anything trains.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from depthgrow.config import RunConfig
from depthgrow.data import load_data
from depthgrow.errors import DepthgrowError
from depthgrow.frontier import Frontier, fit_frontier
from depthgrow.trainer import run_or_reuse

# the families of the default ladder and of --full, each grown from its CPU preset
FAMILY_PRESETS = {"gpt2": "gpt2-micro-bpe", "llama": "llama-micro-bpe", "moe": "moe-micro-bpe"}
DEFAULT_FAMILIES = ("gpt2", "llama")
FULL_FAMILIES = ("gpt2", "llama", "moe")
# widths of the ladder: the default spans 10x in parameters (12K-122K for GPT-2) in about 25 minutes on
# 2 cores; --full goes to 270K, which needs more text than the embedded plays (see MAX_EPOCHS)
DEFAULT_WIDTHS = (8, 12, 20, 32, 40)
FULL_WIDTHS = (8, 12, 20, 32, 48, 64)
TOKENS_PER_PARAM = {"dense": 50.0, "moe": 100.0}  # the paper's
# repeated data: up to about four passes train nearly as well as fresh text (Muennighoff et al., 2023)
MAX_EPOCHS = 4.0
METHODS = {"fixed": None, "0 -> L": 0, "1 -> L": 1}  # name: source depth
GROWTH_AT = 0.8


@dataclass(frozen=True)
class Rung:
    family: str
    width: int
    params: int  # total parameters at full depth (the paper's count)
    config: RunConfig  # the fixed-depth run of this size


def rung_config(base: RunConfig, width: int) -> RunConfig:
    """``base`` at width ``width``: the MLP's (or experts') hidden sizes scaled in proportion, heads kept."""
    model = base.model
    changes: dict[str, Any] = {"n_embd": width}
    for name in ("ffn_hidden", "expert_hidden"):
        hidden = getattr(model, name, None)
        if hidden:
            changes[name] = max(4, round(hidden * width / model.n_embd / 4) * 4)
    return dataclasses.replace(base, model_preset=None, model=dataclasses.replace(model, **changes)).validate()


def family_bases(base: RunConfig, *, full: bool, model_given: bool) -> list[RunConfig]:
    """The recipe of each family of the ladder: the user's model alone if one was given, else the CPU preset
    of each default (or --full) family."""
    if model_given:
        return [base]
    families = FULL_FAMILIES if full else DEFAULT_FAMILIES
    return [base.with_overrides({"model.preset": FAMILY_PRESETS[family]}) for family in families]


def ladder(bases: list[RunConfig], *, widths: tuple[int, ...], tokens_per_param: float | None) -> list[Rung]:
    """The fixed-depth run of every (family, width): ``tokens_per_param`` tokens per parameter (the paper's
    ratio for the family when None), checked against the data before anything trains."""
    if tokens_per_param is not None and not 0 < tokens_per_param < math.inf:
        raise DepthgrowError(f"--tokens-per-param must be a finite number > 0, got {tokens_per_param}")
    rungs = []
    for family_base in bases:
        sparse = family_base.model.num_active_params() < family_base.model.num_params()  # a mixture of experts
        ratio = tokens_per_param or TOKENS_PER_PARAM["moe" if sparse else "dense"]
        tokens_per_step = family_base.train.batch_size * family_base.model.block_size
        for width in widths:
            sized = rung_config(family_base, width)
            params = sized.model.num_params()
            steps = max(10, round(ratio * params / tokens_per_step))
            train = dataclasses.replace(sized.train, steps=steps, eval_every=max(1, steps // 10))
            rungs.append(Rung(sized.model.family, width, params, dataclasses.replace(sized, train=train)))
    _check_data(rungs)
    return rungs


def _check_data(rungs: list[Rung]) -> None:
    largest = max(rungs, key=lambda rung: rung.config.train.steps)
    config = largest.config
    data = load_data(config.data, vocab_size=config.model.vocab_size)
    needed = config.train.steps * config.train.batch_size * config.model.block_size
    if needed > MAX_EPOCHS * len(data.train):
        raise DepthgrowError(
            f"the scaling ladder does not fit the data: its largest model ({largest.family} width {largest.width}, "
            f"{largest.params:,} parameters) trains on {needed / 1e6:.1f}M tokens, more than {MAX_EPOCHS:g} passes "
            f"over the {len(data.train) / 1e6:.2f}M training tokens of {data.source}; lower --tokens-per-param "
            "or give more text (--data)"
        )


def progressive(fixed: RunConfig, source: int) -> RunConfig:
    return fixed.with_overrides({"growth.source_depth": str(source), "growth.at": str(GROWTH_AT)})


def run_scaling(
    rungs: list[Rung], *, stored: Callable[[RunConfig, str], RunConfig], resume_hint: str
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Frontier | None]]]:
    """Train (or reuse) every run of the ladder; the rows (one per run, with its multiplier on its family's
    fixed-depth law) and the laws by family and method. ``stored(config, label)`` places a run in the store."""
    rows = []
    for rung in rungs:
        for method, source in METHODS.items():
            config = rung.config if source is None else progressive(rung.config, source)
            label = f"scaling {rung.family} d={rung.width} {method.replace(' -> ', 'to')}"
            config = stored(config, label)
            summary = run_or_reuse(config, label=label, resume_hint=resume_hint)
            if summary is None:
                raise KeyboardInterrupt
            rows.append(
                {
                    "family": rung.family,
                    "width": rung.width,
                    "params": rung.params,
                    "steps": summary["step"],
                    "tokens": summary["tokens"],
                    "method": method,
                    "flops": summary["flops"],
                    "final_val_loss": summary["final_val_loss"],
                    "run_dir": config.train.out_dir,
                }
            )

    def points(family: str, method: str) -> list[tuple[float, float]]:
        return [(r["flops"], r["final_val_loss"]) for r in rows if (r["family"], r["method"]) == (family, method)]

    families = dict.fromkeys(r["family"] for r in rows)
    laws = {family: {method: fit_frontier(points(family, method)) for method in METHODS} for family in families}
    fixed_rows = {(r["family"], r["width"]): r for r in rows if r["method"] == "fixed"}
    for row in rows:
        fixed_law = laws[row["family"]]["fixed"]
        same_size = fixed_rows[row["family"], row["width"]]
        row["gap_pct"] = 100.0 * (row["final_val_loss"] / same_size["final_val_loss"] - 1.0)
        row["compute_fraction"] = row["flops"] / same_size["flops"]
        # a fixed-depth run on its own law would only show the law's residual
        grown = fixed_law is not None and row["method"] != "fixed"
        multiplier = fixed_law.multiplier(row["flops"], row["final_val_loss"]) if grown else None
        row["compute_multiplier"] = multiplier if multiplier is not None and math.isfinite(multiplier) else None
        row["multiplier_extrapolated"] = fixed_law.extrapolated(row["final_val_loss"]) if grown else None
    return rows, laws


@dataclass(frozen=True)
class Trend:
    """log2(multiplier) = level + slope · (log2(parameters) - center), fitted over the ladder's sizes
    (``center``: their mean log2, where the fit is surest and the slope's error pivots)."""

    slope: float
    level: float
    center: float
    slope_error: float | None  # the slope's standard error (None with fewer than four sizes)
    params: tuple[int, int]  # the smallest and largest size it was fitted on

    def multiplier(self, params: float, slope: float | None = None) -> float:
        slope = self.slope if slope is None else slope
        return 2.0 ** (self.level + slope * (math.log2(params) - self.center))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def trend(rows: list[dict[str, Any]], family: str, method: str) -> Trend | None:
    """How the multiplier changes with size: 2^slope per doubling of the model."""
    points = [(r["params"], r["compute_multiplier"]) for r in rows
              if (r["family"], r["method"]) == (family, method) and r["compute_multiplier"]]  # fmt: skip
    if len(points) < 2:
        return None
    x, y = np.log2([p for p, _ in points]), np.log2([m for _, m in points])
    center = float(x.mean())
    if len(points) >= 4:  # numpy's covariance needs more points than parameters + 1
        (slope, level), covariance = np.polyfit(x - center, y, 1, cov=True)
        error: float | None = float(math.sqrt(covariance[0, 0]))
    else:
        slope, level = np.polyfit(x - center, y, 1)
        error = None
    sizes = [p for p, _ in points]
    return Trend(float(slope), float(level), center, error, (min(sizes), max(sizes)))


def format_scaling(rows: list[dict[str, Any]], laws: dict[str, dict[str, Frontier | None]]) -> str:
    header = ["family", "width", "parameters", "steps", "tokens", "method", "FLOPs", "final val loss",
              "gap % (same size)", "compute fraction", "compute multiplier"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r["compute_multiplier"] is None:
            multiplier = "-" if r["method"] == "fixed" else "no law"
        else:
            multiplier = f"{r['compute_multiplier']:.2f}x" + ("*" if r["multiplier_extrapolated"] else "")
        cells = [r["family"], str(r["width"]), f"{r['params']:,}", str(r["steps"]), f"{r['tokens']:,}", r["method"],
                 f"{r['flops']:.3e}", f"{r['final_val_loss']:.4f}", f"{r['gap_pct']:+.2f}",
                 f"{r['compute_fraction']:.1%}", multiplier]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Laws L(C) = E + A (C / scale)^-alpha over the ladder, and the multiplier's trend with size:", ""]
    for family, by_method in laws.items():
        for method, law in by_method.items():
            fit = "no law (the losses do not fall at every larger size)" if law is None else law.law.text()
            fitted = None if method == "fixed" else trend(rows, family, method)
            change = "" if fitted is None else f"; multiplier x{2**fitted.slope:.2f} per doubling of parameters"
            lines.append(f"- {family} {method}: {fit}{change}")
    lines += ["", "Multiplier: the FLOPs the family's fixed-depth law needs to reach the run's loss, over the "
              "FLOPs spent (* read outside the measured fixed-depth FLOPs)."]  # fmt: skip
    return "\n".join(lines)


def write_scaling(rows: list[dict[str, Any]], laws: dict[str, dict[str, Frontier | None]], folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    result = {
        "runs": rows,
        "laws": {f: {m: None if law is None else law.to_dict() for m, law in by.items()} for f, by in laws.items()},
        "trends": {f: {m: _dict_or_none(trend(rows, f, m)) for m in METHODS if m != "fixed"} for f in laws},
    }
    (folder / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_scaling(rows, laws)
    (folder / "table.md").write_text(table + "\n")
    return table


def _dict_or_none(value: Trend | None) -> dict[str, Any] | None:
    return None if value is None else value.to_dict()
