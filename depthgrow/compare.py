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

from depthgrow.checkpoint import CHECKPOINT_NAME
from depthgrow.config import RESUME_FREE_KEYS, RunConfig, config_differences, read_toml
from depthgrow.errors import DepthgrowError
from depthgrow.growth import COPY_INITS
from depthgrow.metrics import LOG_NAME, read_log
from depthgrow.train import CONFIG_NAME, SUMMARY_NAME, train

FIXED = "fixed"


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
            growth=dataclasses.replace(base.growth, source_depth=None),
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


def _run_once(name: str, config: RunConfig, overwrite: bool) -> dict[str, Any]:
    out_dir = Path(config.train.out_dir)
    saved_config = out_dir / CONFIG_NAME
    same = saved_config.exists() and not config_differences(
        config.to_dict(), RunConfig.from_dict(read_toml(saved_config)).to_dict(), ignore=RESUME_FREE_KEYS
    )
    if same and not overwrite and (out_dir / SUMMARY_NAME).exists():
        print(f"{name}: reusing the finished run in {out_dir}")
    elif same and not overwrite and (out_dir / CHECKPOINT_NAME).exists():
        train(config, resume=True, label=name)
    elif (out_dir / CHECKPOINT_NAME).exists() and not overwrite:
        raise DepthgrowError(
            f"{out_dir} holds a run of another config; pass --overwrite to replace it, or choose another --out"
        )
    else:
        train(config, overwrite=True, label=name)
    summary_path = out_dir / SUMMARY_NAME
    if not summary_path.exists():  # stopped by Ctrl-C: train() has said how to resume
        raise KeyboardInterrupt
    return json.loads(summary_path.read_text())


def compare(base: RunConfig, *, sources: list[int], overwrite: bool = False) -> list[dict[str, Any]]:
    configs = run_configs(base, sources)
    summaries = {name: _run_once(name, config, overwrite) for name, config in configs.items()}
    fixed = summaries[FIXED]
    rows = []
    for name, config in configs.items():
        summary = summaries[name]
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
                "wall_s": summary["train_time_s"],
                "wall_fraction": summary["train_time_s"] / fixed["train_time_s"],
            }
        )
    root = Path(base.train.out_dir)
    (root / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = format_table(rows)
    (root / "summary.md").write_text(table + "\n")
    print(table)
    logs = {name: read_log(Path(config.train.out_dir) / LOG_NAME) for name, config in configs.items()}
    try:
        from depthgrow.plot import plot_compare
    except ImportError:
        print("no plot written: matplotlib is missing (pip install 'depthgrow[plot]')")
    else:
        plot_path = plot_compare(logs, root / "compare.png", title=_title(base))
        print(f"plot: {plot_path}")
    print(f"summary: {root / 'summary.json'}")
    return rows


def _title(config: RunConfig) -> str:
    model = config.model
    name = config.model_preset or model.family
    return (
        f"{name} ({model.n_layer} layers), {config.optim.name} lr {config.optim.lr:g}, "
        f"{config.schedule.name}, T={config.train.steps}"
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: speedup is fixed / progressive, by FLOPs and by wall clock."""
    header = (
        "| run | source depth | init | grows at step | final val loss | gap % | FLOPs | compute fraction "
        "| wall s | wall fraction | speedup (FLOPs / wall) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        source = "-" if row["source_depth"] is None else str(row["source_depth"])
        steps = ", ".join(map(str, row["growth_steps"])) or "-"
        lines.append(
            f"| {row['name']} | {source} | {row['init'] or '-'} | {steps} | {row['final_val_loss']:.4f} "
            f"| {row['gap_pct']:+.2f} | {row['flops']:.3g} | {row['compute_fraction']:.1%} | {row['wall_s']:.1f} "
            f"| {row['wall_fraction']:.1%} | {1 / row['compute_fraction']:.2f}x / {1 / row['wall_fraction']:.2f}x |"
        )
    return "\n".join(lines)
