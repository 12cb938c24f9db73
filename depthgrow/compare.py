"""The main job: the fixed-depth baseline against zero- and one-layer progressive runs of one recipe, and
the compute-matched baseline that says what growth is worth.

Beside the full-length fixed-depth run it trains fixed-depth runs of the same recipe at shorter lengths,
each with its own complete schedule (see :func:`depthgrow.frontier.ladder_fractions`: one per progressive
run's compute fraction, one at half the smallest); through them it fits the fixed-depth loss-versus-FLOPs
law and reads off each progressive run's compute-matched loss and compute multiplier.

Each run is an ordinary training run in its own folder under the compare folder, so an interrupted
compare continues where it stopped: finished runs of the same config are reused, started ones resumed.
The outputs are ``summary.json`` (one entry per run, and the fitted frontier), ``summary.md`` (the table
that is printed) and ``compare.png`` (validation loss against cumulative FLOPs, with the fixed-depth
frontier, and against step, the expansion marked).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from depthgrow.analysis import DEFAULT_MIX_TOLERANCE, closest_gap, eval_curve, last_growth_step, mixing_time
from depthgrow.config import RunConfig
from depthgrow.distributed import main_process
from depthgrow.errors import DepthgrowError
from depthgrow.flops import DEPTHGROW, PAPER, FlopCounting, plan_flops
from depthgrow.frontier import MIN_POINTS, Frontier, fit_frontier, ladder_fractions
from depthgrow.growth import COPY_INITS, GrowthConfig
from depthgrow.metrics import LOG_NAME, read_log
from depthgrow.trainer import run_or_reuse

FIXED = "fixed"
COMPARE_RESUME_HINT = "the same depthgrow compare command (finished runs are reused, started ones resumed)"


def run_configs(base: RunConfig, sources: list[int]) -> dict[str, RunConfig]:
    """The baseline and one progressive run per source depth, identical but for the growth section.

    A zero-layer source has no block to copy: with a copy init it grows with ``random`` (``zero`` with
    ``copy_zero``), the only inits the paper uses from zero layers.
    """
    target = base.model.n_layer
    root = Path(base.train.out_dir)
    configs = {FIXED: fixed_depth(base, base.train.steps, root / FIXED)}
    for source in sources:
        if not 0 <= source < target:
            raise DepthgrowError(f"compare source depth {source} must be in [0, {target}) for model.n_layer={target}")
        init = base.growth.init
        if source == 0 and init in COPY_INITS:
            init = "zero" if init == "copy_zero" else "random"
        name = f"grow{source}"
        configs[name] = dataclasses.replace(
            base,
            growth=dataclasses.replace(base.growth, source_depth=source, init=init),
            train=dataclasses.replace(base.train, out_dir=str(root / name)),
        ).validate()
    return configs


def fixed_depth(base: RunConfig, steps: int, out_dir: Path) -> RunConfig:
    """``base`` at its target depth throughout, trained for ``steps`` steps (its schedule scaled to them)."""
    # the growth options do not concern a fixed-depth run: leaving them out lets it be reused when they change
    train = dataclasses.replace(base.train, steps=steps, out_dir=str(out_dir))
    return dataclasses.replace(base, growth=GrowthConfig(), train=train).validate()


def compute_fraction(config: RunConfig) -> float:
    """The FLOPs of ``config``'s run over those of its fixed-depth run of the same length (depthgrow counting)."""
    return run_flops(config, DEPTHGROW) / run_flops(dataclasses.replace(config, growth=GrowthConfig()), DEPTHGROW)


def ladder_configs(base: RunConfig, fractions: list[float]) -> dict[str, RunConfig]:
    """The shorter fixed-depth runs that trace the frontier, named by their length: ``fixed-T{steps}``."""
    root = Path(base.train.out_dir)
    steps = sorted({max(1, round(f * base.train.steps)) for f in fractions if f < 1.0})
    return {f"{FIXED}-T{s}": fixed_depth(base, s, root / f"{FIXED}-T{s}") for s in steps if s < base.train.steps}


def compare(
    base: RunConfig, *, sources: list[int], overwrite: bool = False, mix_tolerance: float = DEFAULT_MIX_TOLERANCE
) -> list[dict[str, Any]]:
    configs = run_configs(base, sources)
    fractions = [compute_fraction(config) for name, config in configs.items() if name != FIXED]
    configs.update(ladder_configs(base, ladder_fractions(fractions)))
    summaries = {}
    for name, config in configs.items():
        summary = run_or_reuse(config, label=name, overwrite=overwrite, resume_hint=COMPARE_RESUME_HINT)
        if summary is None:  # stopped by Ctrl-C, with a checkpoint
            raise KeyboardInterrupt
        summaries[name] = summary
    if not main_process():  # under torchrun every rank trained; rank 0 reports
        return []
    logs = {name: read_log(Path(config.train.out_dir) / LOG_NAME) for name, config in configs.items()}
    fixed_names = [name for name, config in configs.items() if config.growth.source_depth is None]
    frontier = fit_frontier([(summaries[n]["flops"], summaries[n]["final_val_loss"]) for n in fixed_names])
    rows = [
        _row(name, config, summaries[name], summaries[FIXED], logs[name], logs[FIXED], frontier, mix_tolerance)
        for name, config in configs.items()
    ]
    root = Path(base.train.out_dir)
    result = {"runs": rows, "frontier": None if frontier is None else frontier.to_dict()}
    (root / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_table(rows) + "\n\n" + frontier_text(frontier, rows)
    (root / "summary.md").write_text(table + "\n")
    print(table)
    try:
        from depthgrow.plot import plot_compare
    except ImportError:
        print("no plot written: matplotlib is missing (pip install 'depthgrow[plot]')")
    else:
        plot_path = plot_compare(logs, root / "compare.png", title=_title(base), frontier=frontier)
        print(f"plot: {plot_path}")
    print(f"summary: {root / 'summary.json'}")
    return rows


def run_flops(config: RunConfig, counting: FlopCounting) -> float:
    """The training FLOPs of ``config``'s run, by ``counting``, from its plan (no run needed)."""
    units_per_step = config.train.batch_size * config.model.units_per_example()
    return plan_flops(
        config.model, config.plan(), total_steps=config.train.steps, units_per_step=units_per_step, counting=counting
    )


def _row(
    name: str,
    config: RunConfig,
    summary: dict[str, Any],
    fixed: dict[str, Any],
    log: list[dict[str, Any]],
    fixed_log: list[dict[str, Any]],
    frontier: Frontier | None,
    mix_tolerance: float,
) -> dict[str, Any]:
    growth_step = last_growth_step(log)
    mixing = closest = None
    if growth_step is not None:
        mixing = mixing_time(eval_curve(log), eval_curve(fixed_log), growth_step, mix_tolerance)
        closest = closest_gap(eval_curve(log), eval_curve(fixed_log), growth_step)
    full = fixed_depth(config, fixed["step"], Path(config.train.out_dir))  # the full-length baseline's config
    paper, paper_full = run_flops(config, PAPER), run_flops(full, PAPER)
    return {
        "name": name,
        "steps": summary["step"],
        "source_depth": config.growth.source_depth,
        "method": None if config.growth.source_depth is None else config.growth.method,
        "init": None if config.growth.source_depth is None else config.plan().init,
        "growth_steps": summary["growth_steps"],
        "final_val_loss": summary["final_val_loss"],
        "gap_pct": 100.0 * (summary["final_val_loss"] / fixed["final_val_loss"] - 1.0),
        "flops": summary["flops"],
        "compute_fraction": summary["flops"] / fixed["flops"],
        "flops_paper": paper,
        "compute_fraction_paper": paper / paper_full,
        "wall_s": _wall(summary),
        "wall_fraction": _wall(summary) / _wall(fixed),
        "mixing_steps": mixing,
        "mix_tolerance": mix_tolerance,
        "closest_gap_pct": closest,
        **multiplier_fields(frontier, summary["flops"], summary["final_val_loss"], paper, paper_full / fixed["flops"]),
    }


def multiplier_fields(
    frontier: Frontier | None, flops: float, loss: float, flops_paper: float, fixed_paper_per_flop: float
) -> dict[str, Any]:
    """A run's place on the fixed-depth frontier: the compute-matched loss and the compute multiplier, by
    depthgrow's counting and by the paper's (the frontier's FLOPs rescaled to it: all its runs share one
    depth, so one factor converts them)."""
    if frontier is None:
        return {"compute_matched_loss": None, "compute_multiplier": None, "compute_multiplier_paper": None,
                "multiplier_extrapolated": None}  # fmt: skip
    multiplier = frontier.multiplier(flops, loss)
    finite = math.isfinite(multiplier)  # not below the law's floor E, which no fixed-depth run reaches
    return {
        "compute_matched_loss": frontier.compute_matched_loss(flops),
        "compute_multiplier": multiplier if finite else None,
        "compute_multiplier_paper": multiplier * flops * fixed_paper_per_flop / flops_paper if finite else None,
        "multiplier_extrapolated": frontier.extrapolated(loss),
    }


def _wall(summary: dict[str, Any]) -> float:
    """Time spent training, the growth itself included; evaluation and checkpoints excluded."""
    return summary["train_time_s"] + summary["growth_time_s"]


def _title(config: RunConfig) -> str:
    model = config.model
    name = config.model_preset or model.family
    vocabulary = model.vocab_size if model.task == "lm" else None
    shape = f"{model.n_layer} layers" + ("" if vocabulary is None else f", vocabulary {vocabulary}")
    return (
        f"{name} ({shape}), {config.optim.name} lr {config.optim.lr:g}, {config.schedule.name}, T={config.train.steps}"
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table. "growth": source -> target depth at a step, and the init; gap % against the
    full-length fixed-depth run; "mixed after": steps after the (last) expansion until the validation loss
    came within the tolerance of the baseline's at the same step ("never" if it did not), "closest gap"
    the smallest gap after it; compute fraction by depthgrow's counting (and by the paper's, 6 x every
    parameter); speedup is fixed / run, by FLOPs and by wall clock; "compute-matched loss" is where the
    fixed-depth frontier is at the run's FLOPs, and the multiplier the FLOPs a fixed-depth run needs to
    reach the run's loss over the run's FLOPs (an asterisk: read outside the measured fixed-depth runs)."""
    header = (
        "| run | growth | steps | final val loss | gap % | closest gap % | mixed after | FLOPs | compute fraction "
        "(paper) | wall s | wall fraction | speedup (FLOPs / wall) | compute-matched loss | compute multiplier |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        multiplier = "-" if row["source_depth"] is None else multiplier_text(row)
        matched = "-" if row["compute_matched_loss"] is None else f"{row['compute_matched_loss']:.4f}"
        cells = [
            row["name"],
            _growth_text(row),
            str(row["steps"]),
            f"{row['final_val_loss']:.4f}",
            f"{row['gap_pct']:+.2f}",
            "-" if row["closest_gap_pct"] is None else f"{row['closest_gap_pct']:+.2f}",
            _mixing_text(row),
            f"{row['flops']:.3g}",
            f"{row['compute_fraction']:.1%} ({row['compute_fraction_paper']:.1%})",
            f"{row['wall_s']:.1f}",
            f"{row['wall_fraction']:.1%}",
            f"{1 / row['compute_fraction']:.2f}x / {1 / row['wall_fraction']:.2f}x",
            matched,
            multiplier,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_text(frontier: Frontier | None, rows: list[dict[str, Any]]) -> str:
    """A line on the fixed-depth frontier the multipliers come from."""
    fixed = sorted((row["steps"], row["final_val_loss"]) for row in rows if row["source_depth"] is None)
    if frontier is None:
        losses = ", ".join(f"T = {steps}: {loss:.4f}" for steps, loss in fixed)
        return (
            f"fixed-depth frontier: not fitted, so no compute multipliers: the fixed-depth losses ({losses}) do not "
            "fall at every longer run (overfitting, or differences within noise)"
            if len(fixed) >= MIN_POINTS
            else f"fixed-depth frontier: not fitted, so no compute multipliers: {len(fixed)} fixed-depth lengths, "
            f"a law needs {MIN_POINTS}"
        )
    residuals = ", ".join(f"{r:+.4f}" for r in frontier.residuals)
    return (
        f"fixed-depth frontier (FLOPs C, depthgrow counting): {frontier.law.text()}, fitted to the fixed-depth "
        f"runs of T = {', '.join(str(steps) for steps, _ in fixed)} steps; residuals {residuals}"
    )


def multiplier_text(row: dict[str, Any]) -> str:
    """The compute multiplier of a row (an asterisk: read outside the measured fixed-depth runs)."""
    if row["compute_multiplier"] is None:
        return "-" if row["compute_matched_loss"] is None else "beyond the fixed-depth floor E"
    star = "*" if row["multiplier_extrapolated"] else ""
    return f"{row['compute_multiplier']:.2f}x{star} (paper {row['compute_multiplier_paper']:.2f}x)"


def _growth_text(row: dict[str, Any]) -> str:
    if row["source_depth"] is None:
        return "fixed depth"
    method = "" if row.get("method", "bu") == "bu" else f"{row['method']} "  # summaries before methods have none
    return f"{method}{row['source_depth']} -> L at {', '.join(map(str, row['growth_steps']))} ({row['init']})"


def _mixing_text(row: dict[str, Any]) -> str:
    if row["source_depth"] is None:
        return "-"
    if row["mixing_steps"] is None:
        return "never"
    return f"{row['mixing_steps']} steps"
