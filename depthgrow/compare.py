"""The main job: the fixed-depth baseline against zero- and one-layer progressive runs of one recipe.

Each run is an ordinary training run in its own folder under the compare folder, so an interrupted
compare continues where it stopped: finished runs of the same config are reused, started ones resumed.
The outputs are ``summary.json`` (one entry per run), ``summary.md`` (the table that is printed) and
``compare.png`` (validation loss against cumulative FLOPs and against step, the expansion marked).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from depthgrow.analysis import DEFAULT_MIX_TOLERANCE, closest_gap, eval_curve, last_growth_step, mixing_time
from depthgrow.config import RunConfig
from depthgrow.errors import DepthgrowError
from depthgrow.growth import COPY_INITS, GrowthConfig
from depthgrow.metrics import LOG_NAME, read_log
from depthgrow.train import run_or_reuse

FIXED = "fixed"
COMPARE_RESUME_HINT = "the same depthgrow compare command (finished runs are reused, started ones resumed)"


def run_configs(base: RunConfig, sources: list[int]) -> dict[str, RunConfig]:
    """The baseline and one progressive run per source depth, identical but for the growth section.

    A zero-layer source has no block to copy: with a copy init it grows with ``random`` (``zero`` with
    ``copy_zero``), the only inits the paper uses from zero layers.
    """
    target = base.model.n_layer
    root = Path(base.train.out_dir)
    configs = {
        FIXED: dataclasses.replace(
            base,
            # the growth options do not concern the baseline: leaving them out lets it be reused when they change
            growth=GrowthConfig(),
            train=dataclasses.replace(base.train, out_dir=str(root / FIXED)),
        )
    }
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


def compare(
    base: RunConfig, *, sources: list[int], overwrite: bool = False, mix_tolerance: float = DEFAULT_MIX_TOLERANCE
) -> list[dict[str, Any]]:
    configs = run_configs(base, sources)
    summaries = {}
    for name, config in configs.items():
        summary = run_or_reuse(config, label=name, overwrite=overwrite, resume_hint=COMPARE_RESUME_HINT)
        if summary is None:  # stopped by Ctrl-C, with a checkpoint
            raise KeyboardInterrupt
        summaries[name] = summary
    logs = {name: read_log(Path(config.train.out_dir) / LOG_NAME) for name, config in configs.items()}
    fixed = summaries[FIXED]
    baseline_curve = eval_curve(logs[FIXED])
    rows = []
    for name, config in configs.items():
        summary = summaries[name]
        growth_step = last_growth_step(logs[name])
        mixing = closest = None
        if growth_step is not None:
            mixing = mixing_time(eval_curve(logs[name]), baseline_curve, growth_step, mix_tolerance)
            closest = closest_gap(eval_curve(logs[name]), baseline_curve, growth_step)
        rows.append(
            {
                "name": name,
                "source_depth": config.growth.source_depth,
                "init": None if name == FIXED else config.growth.init,
                "growth_steps": summary["growth_steps"],
                "final_val_loss": summary["final_val_loss"],
                "gap_pct": 100.0 * (summary["final_val_loss"] / fixed["final_val_loss"] - 1.0),
                "flops": summary["flops"],
                "compute_fraction": summary["flops"] / fixed["flops"],
                "wall_s": _wall(summary),
                "wall_fraction": _wall(summary) / _wall(fixed),
                "mixing_steps": mixing,
                "mix_tolerance": mix_tolerance,
                "closest_gap_pct": closest,
            }
        )
    root = Path(base.train.out_dir)
    (root / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = format_table(rows)
    (root / "summary.md").write_text(table + "\n")
    print(table)
    try:
        from depthgrow.plot import plot_compare
    except ImportError:
        print("no plot written: matplotlib is missing (pip install 'depthgrow[plot]')")
    else:
        plot_path = plot_compare(logs, root / "compare.png", title=_title(base))
        print(f"plot: {plot_path}")
    print(f"summary: {root / 'summary.json'}")
    return rows


def _wall(summary: dict[str, Any]) -> float:
    """Time spent training, the growth itself included; evaluation and checkpoints excluded."""
    return summary["train_time_s"] + summary["growth_time_s"]


def _title(config: RunConfig) -> str:
    model = config.model
    name = config.model_preset or model.family
    return (
        f"{name} ({model.n_layer} layers), {config.optim.name} lr {config.optim.lr:g}, "
        f"{config.schedule.name}, T={config.train.steps}"
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: speedup is fixed / progressive, by FLOPs and by wall clock; "mixed after" is the
    number of steps after the (last) expansion until the validation loss came within the tolerance of
    the baseline's at the same step ("never" if it did not), and "closest gap" the smallest gap after it."""
    header = (
        "| run | source depth | init | grows at step | final val loss | gap % | closest gap % | mixed after | FLOPs "
        "| compute fraction "
        "| wall s | wall fraction | speedup (FLOPs / wall) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        source = "-" if row["source_depth"] is None else str(row["source_depth"])
        steps = ", ".join(map(str, row["growth_steps"])) or "-"
        cells = [
            row["name"],
            source,
            row["init"] or "-",
            steps,
            f"{row['final_val_loss']:.4f}",
            f"{row['gap_pct']:+.2f}",
            "-" if row["closest_gap_pct"] is None else f"{row['closest_gap_pct']:+.2f}",
            _mixing_text(row),
            f"{row['flops']:.3g}",
            f"{row['compute_fraction']:.1%}",
            f"{row['wall_s']:.1f}",
            f"{row['wall_fraction']:.1%}",
            f"{1 / row['compute_fraction']:.2f}x / {1 / row['wall_fraction']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mixing_text(row: dict[str, Any]) -> str:
    if row["source_depth"] is None:
        return "-"
    if row["mixing_steps"] is None:
        return "never"
    return f"{row['mixing_steps']} steps"
