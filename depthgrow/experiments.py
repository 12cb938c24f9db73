"""The paper's ablations as named, rerunnable experiments: ``depthgrow experiment NAME [--full]``.

Each experiment is a list of variants of one base recipe. Every progressive variant is measured
against the fixed-depth run of the same config (its growth section removed), so a variant that changes
the schedule or the optimizer gets its own baseline. Runs live in a content-addressed store
(``<out>/runs/<label>-<hash of the config>``): a run of the same config is trained once and reused by
every experiment and rerun, and an interrupted experiment continues where it stopped.

Each experiment writes ``<out>/<name>/``: ``table.md``, ``summary.json`` and ``plot.png``. The default
grid is small enough for a 2-core CPU; ``--full`` is the grid closer to the paper's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from depthgrow.analysis import DEFAULT_MIX_TOLERANCE, closest_gap, eval_curve, last_growth_step, mixing_time
from depthgrow.compare import fixed_depth, multiplier_fields, multiplier_text, run_flops
from depthgrow.config import RunConfig, load_config
from depthgrow.distributed import main_process
from depthgrow.errors import DepthgrowError
from depthgrow.flops import PAPER
from depthgrow.frontier import Frontier, fit_frontier
from depthgrow.metrics import LOG_NAME, read_log
from depthgrow.trainer import run_or_reuse

PlotKind = Literal["curves", "methods", "sweep", "pareto", "lr", "regime"]


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: dict[str, str]  # applied over the experiment's base
    series: str = ""  # the line it belongs to in a sweep or Pareto plot
    x: float | None = None  # its coordinate in a sweep (the expansion time as a fraction of T)


@dataclass(frozen=True)
class Experiment:
    name: str
    # what it measures, as a question, with the paper's answer where it gives one ("the paper: ..."): a claim,
    # which the runs of docs/results.md did not always confirm
    question: str
    plot: PlotKind
    variants: Callable[[bool, RunConfig], list[Variant]]  # (full grid or not, base config) -> variants
    base: Callable[[bool], dict[str, str]] = lambda full: {}  # settings under the user's overrides
    x_label: str = "expansion time (fraction of T)"  # what a sweep's x is
    # trace each baseline's loss-versus-FLOPs frontier (shorter fixed-depth runs) for the compute multiplier
    frontier: bool = True


def _growth(source: int, at: float, init: str = "random", **more: str) -> dict[str, str]:
    return {"growth.source_depth": str(source), "growth.at": str(at), "growth.init": init, **more}


def _init_variants(full: bool, base: RunConfig) -> list[Variant]:
    one_layer = [Variant(f"1 -> L {init}", _growth(1, 0.8, init)) for init in ("random", "copy", "zero", "copy_zero")]
    orders = ("copy", "copy_inter", "copy_last")
    two_layers = [Variant(f"2 -> L {init}", _growth(2, 0.8, init)) for init in orders]
    return one_layer + two_layers


def _timing_variants(full: bool, base: RunConfig) -> list[Variant]:
    taus = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9) if full else (0.2, 0.5, 0.8)
    return [
        Variant(f"{schedule} tau={tau}", {"schedule.name": schedule, **_growth(0, tau)}, series=schedule, x=tau)
        for schedule in ("wsd", "cosine")
        for tau in taus
    ]


def _stage_variants(full: bool, base: RunConfig) -> list[Variant]:
    return [
        Variant("0 -> 2 -> L", _growth(0, 0.4, **{"growth.via": "2"}) | {"growth.at": "0.4,0.8"}),
        Variant("2 -> L", _growth(2, 0.8)),
        Variant("0 -> L", _growth(0, 0.8)),
    ]


def _source_variants(full: bool, base: RunConfig) -> list[Variant]:
    taus = (0.5, 0.6, 0.7, 0.8, 0.9) if full else (0.5, 0.8)
    sources = (0, 1, 2, 4, 6) if full else (0, 1, 2, 4)
    return [
        Variant(f"{s} -> L tau={tau}", _growth(s, tau), series=f"source {s}", x=tau) for s in sources for tau in taus
    ]


def _optimizer_variants(full: bool, base: RunConfig) -> list[Variant]:
    # each optimizer with its own default learning rate and weight decay (optim.OPTIMIZER_DEFAULTS); Muon-NSGD
    # as the paper defines it (Muon on every matrix) and with Muon on the blocks' matrices only
    optimizers = {
        "adamw": {"optim.name": "adamw"},
        "muon-nsgd": {"optim.name": "muon-nsgd", "optim.muon_scope": "all"},
        "muon-nsgd blocks": {"optim.name": "muon-nsgd", "optim.muon_scope": "blocks"},
    }
    return [
        Variant(f"{name} {source} -> L", {**settings, **_growth(source, 0.8)}, series=name)
        for name, settings in optimizers.items()
        for source in (0, 1)
    ]


def _recipe_variants(full: bool, base: RunConfig) -> list[Variant]:
    """The choices the paper leaves to an implementation: Muon's per-matrix step scale and the weight init,
    each at learning rates around the recipe's, for a zero-layer run and its fixed-depth baseline."""
    factors = (0.5, 1.0, 2.0) if full else (1.0, 2.0)
    return [
        Variant(
            f"{adjust} {weight_init} lr x{factor:g}",
            {
                "optim.muon_adjust_lr": adjust,
                "model.weight_init": weight_init,
                "optim.lr": f"{base.optim.lr * factor:g}",
                **_growth(0, 0.8),
            },
            series=f"{adjust} {weight_init}",
            x=base.optim.lr * factor,
        )
        for adjust in ("original", "match_rms_adamw")
        for weight_init in ("standard", "spectral")
        for factor in factors
    ]


def _regime_variants(full: bool, base: RunConfig) -> list[Variant]:
    """Where the zero-layer phase could pay: the vocabulary (bytes against BPE vocabularies, so the
    embedding's share of the parameters), the model's width (tokens per parameter at a fixed number of
    steps) and the optimizer's scope (Muon on every matrix, the paper's, or on the blocks' only)."""
    width = base.model.n_embd
    vocabularies = (256, 1024, 2048, 4096, 8192) if full else (256, 1024, 2048, 4096)
    cells = [(width, vocab, "all") for vocab in vocabularies]
    cells += [(width, vocab, "blocks") for vocab in (vocabularies if full else (256, 2048))]
    cells += [(width // 2, vocab, "all") for vocab in (vocabularies if full else (1024, 2048))]
    if full:
        cells += [(width * 2, vocab, "all") for vocab in (256, 2048)]
    return [
        Variant(
            f"d={d} V={vocab} muon {scope} {source} -> L",
            {"model.n_embd": str(d), "model.vocab_size": str(vocab), "optim.muon_scope": scope, **_growth(source, 0.8)},
            series=f"d={d} muon {scope} source {source}",
            x=vocab,
        )
        for d, vocab, scope in cells
        for source in (0, 1)
    ]


def _horizon_variants(full: bool, base: RunConfig) -> list[Variant]:
    """The same recipe run for more and more steps, so that more steps follow the expansion at 0.8 T."""
    lengths = (2500, 5000, 10000, 20000) if full else (500, 1000, 2000)
    return [
        Variant(
            f"{source} -> L T={steps}",
            {**_growth(source, 0.8), "train.steps": str(steps)},
            series=f"source {source}",
            x=steps,
        )  # fmt: skip
        for source in (0, 1)
        for steps in lengths
    ]


def _lr_variants(full: bool, base: RunConfig) -> list[Variant]:
    """Peak learning rates around the recipe's, for the fixed-depth baseline and the progressive runs."""
    factors = (0.25, 0.5, 1.0, 2.0, 4.0) if full else (0.5, 1.0, 2.0)
    return [
        Variant(
            f"{source} -> L lr x{factor:g}",
            {**_growth(source, 0.8), "optim.lr": f"{base.optim.lr * factor:g}"},
            series=f"source {source}",
            x=base.optim.lr * factor,
        )
        for source in (0, 1)
        for factor in factors
    ]


# G_stack's growth after ~10B of the 7B model's 300B tokens (Du et al. 2024): its fitted formula
# (depthgrow.methods.gstack_growth_tokens) exceeds any budget far below the 410M-7B models it was fitted on
GSTACK_AT = 0.033


def _method_variants(full: bool, base: RunConfig) -> list[Variant]:
    """Each growth method at its paper's settings; ``--full`` adds other settings per method and a target
    twice as deep (its variants in a series of their own, with their own baseline)."""

    def method(name: str, **settings: str) -> dict[str, str]:
        return {"growth.method": name, **{f"growth.{key}": value for key, value in settings.items()}}

    main = [
        Variant("bu 0 -> L at 0.8", method("bu", source_depth="0", at="0.8", init="random")),
        Variant("bu 1 -> L at 0.8 copy", method("bu", source_depth="1", at="0.8", init="copy")),
        Variant(f"gstack L/4 -> L at {GSTACK_AT}", method("gstack", at=str(GSTACK_AT))),
        Variant("midas L/4 stages PROP-1", method("midas")),
        Variant("msg 1 -> L at 0.8", method("msg", source_depth="1", at="0.8", init="random")),
        Variant("lemon 1 -> L at 0.8", method("lemon", source_depth="1", at="0.8")),
    ]
    if not full:
        return main
    more = [
        Variant("bu 1 -> L at 0.5 copy", method("bu", source_depth="1", at="0.5", init="copy")),
        *[Variant(f"gstack L/4 -> L at {at}", method("gstack", at=at)) for at in ("0.1", "0.25", "0.5")],
        Variant("gstack L/2 -> L at 0.25", method("gstack", stack_factor="2", at="0.25")),
        *[Variant(f"midas L/4 stages PROP-{alpha}", method("midas", prop_alpha=alpha)) for alpha in ("0", "2")],
        Variant("msg 0 -> L at 0.8", method("msg", source_depth="0", at="0.8", init="random")),
        Variant("msg 1 -> L at 0.5", method("msg", source_depth="1", at="0.5", init="random")),
        Variant("msg 1 -> L at 0.8 ramp 0.15", method("msg", source_depth="1", at="0.8", init="random", ramp="0.15")),
        Variant("lemon 1 -> L at 0.5", method("lemon", source_depth="1", at="0.5")),
    ]
    depth = str(2 * base.model.n_layer)
    deeper = [
        Variant(f"{v.label} ({depth} layers)", {**v.overrides, "model.n_layer": depth}, series=f"{depth} layers")
        for v in main
    ]
    return main + more + deeper


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "init",
            "how do the new-layer inits compare from one layer (the paper: copy >= random >> zero, copy_zero), and "
            "the copy orders from two?",
            "curves",
            _init_variants,
        ),
        Experiment(
            "timing",
            "how late can an expansion come and still mix, under WSD and under cosine (the paper: at 0.8 T under "
            "WSD, not after ~0.5 T under cosine)?",
            "sweep",
            _timing_variants,
        ),
        Experiment(
            "stages", "does one expansion 0 -> L beat two, 0 -> 2 -> L (the paper: it does)?", "curves", _stage_variants
        ),
        Experiment(
            "sources",
            "which source depths are on the loss-versus-compute Pareto front (the paper: zero and one layer, not "
            "deeper ones)?",
            "pareto",
            _source_variants,
            base=lambda full: {"model.n_layer": "8"},
        ),
        Experiment(
            "optimizer",
            "how do AdamW and Muon-NSGD (Muon on every matrix, or on the blocks' only) compare, fixed and progressive?",
            "curves",
            _optimizer_variants,
        ),
        Experiment(
            "recipe",
            "which of Muon's step scales (torch's adjust_lr_fn) and weight inits (standard or muP-style spectral) "
            "trains best, each at two learning rates (three with --full), for the zero-layer run and its "
            "fixed-depth baseline?",
            "lr",
            _recipe_variants,
            frontier=False,  # a choice between recipes, made on their losses
        ),
        Experiment(
            "regime",
            "is the zero-layer phase worth more than its FLOPs where the embedding is a large share of the model "
            "(subword vocabularies), and with the paper's optimizer (Muon on every matrix)?",
            "regime",
            _regime_variants,
            x_label="vocabulary size",
        ),
        Experiment(
            "horizon",
            "does the gap close as more steps follow the expansion (longer runs at the same tau)?",
            "sweep",
            _horizon_variants,
            x_label="total steps T (the expansion at 0.8 T)",
        ),
        Experiment(
            "methods",
            "which depth-growth method saves compute against fixed-depth runs given the same FLOPs: the paper's "
            "(bu), G_stack, MIDAS, MSG or LEMON, each at its paper's settings?",
            "methods",
            _method_variants,
            base=lambda full: {"model.n_layer": "8"},
        ),
        Experiment(
            "lr",
            "which peak learning rate is best, for the fixed-depth baseline and the progressive runs alike?",
            "lr",
            _lr_variants,
            frontier=False,  # a tuning sweep, read on final losses; each lr's own frontier would triple its cost
        ),
    )
}


SCALING = "scaling"  # the scaling ladder: not a list of variants of one base (see depthgrow.scaling)
SCALING_QUESTION = (
    "how does the compute multiplier of zero- and one-layer growth change with the model's size, at a fixed "
    "number of tokens per parameter (the paper's v2: 3-5x at 0.25B-2B parameters, growing with scale)?"
)
NAMES = (*EXPERIMENTS, SCALING)


# fields that came after runs were first stored: part of a run's identity only when set away from their
# defaults, so that the runs stored before them are still found
_LATER_FIELDS = {
    "train": ("parallel", "compile", "precision", "peak_tflops", "loggers"),
    "growth": ("method", "stack_factor", "prop_alpha", "ramp"),
}


def config_hash(config: RunConfig) -> str:
    identity = config.to_dict()
    for section, names in _LATER_FIELDS.items():
        defaults = type(getattr(config, section))()
        identity[section] = {
            key: value
            for key, value in identity[section].items()
            if not (key in names and value == getattr(defaults, key))
        }
    identity["train"]["out_dir"] = None
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def stored_run(config: RunConfig, store: Path, label: str) -> RunConfig:
    """``config`` placed in the content-addressed store under ``label``."""
    slug = re.sub(r"[^A-Za-z0-9_.=]+", "-", label).strip("-")
    out_dir = store / f"{slug}-{config_hash(config)}"
    return dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=str(out_dir)))


# the default grid shortens the compare recipe's run so that every experiment's grid together fits in
# about half an hour on 2 CPU cores; the full grid keeps the recipe's length
DEFAULT_GRID = {"train.steps": "1500", "train.eval_every": "100"}


def experiment_base(
    name: str, *, config_path: str | Path | None = None, overrides: dict[str, str] | None = None, full: bool = False
) -> RunConfig:
    """The base recipe of an experiment: the defaults, the grid's run length and the experiment's own
    settings, then the user's config file and overrides (which win)."""
    if name not in NAMES:
        raise DepthgrowError(f"unknown experiment {name!r}; choose one of: {', '.join(NAMES)}")
    # the scaling ladder sets every run's length itself (tokens per parameter)
    grid = {} if full or name == SCALING else DEFAULT_GRID
    own = {**grid, **(EXPERIMENTS[name].base(full) if name in EXPERIMENTS else {})}
    if config_path is not None:
        return load_config(config_path, {**own, **(overrides or {})})
    return load_config(None, {**own, **(overrides or {})})


def run_experiment(
    name: str,
    base: RunConfig,
    *,
    out: str | Path,
    full: bool = False,
    mix_tolerance: float = DEFAULT_MIX_TOLERANCE,
) -> list[dict[str, Any]]:
    """Train (or reuse) every run of experiment ``name`` over ``base`` (see :func:`experiment_base`) and
    write its table, summary and plot."""
    if name not in EXPERIMENTS:
        raise DepthgrowError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    experiment = EXPERIMENTS[name]
    out = Path(out)
    store = out / "runs"
    rows, logs = [], {}
    frontiers: dict[str, Frontier | None] = {}  # by the baseline's run folder
    baselines: dict[str, RunConfig] = {}  # by run folder, in the order of first use
    for variant in experiment.variants(full, base):
        config = stored_run(base.with_overrides(variant.overrides), store, variant.label)
        baseline = stored_run(fixed_depth(config, config.train.steps, Path()), store, "fixed")
        summaries = {}
        for label, run in (("baseline", baseline), (variant.label, config)):
            summary = run_or_reuse(run, label=label, resume_hint=f"the same depthgrow experiment {name} command")
            if summary is None:
                raise KeyboardInterrupt
            summaries[label] = summary
        if baseline.train.out_dir not in frontiers:
            frontiers[baseline.train.out_dir] = (
                _frontier(baseline, summaries["baseline"], store, name) if experiment.frontier else None
            )
        run_log = read_log(Path(config.train.out_dir) / LOG_NAME)
        baseline_log = read_log(Path(baseline.train.out_dir) / LOG_NAME)
        logs[variant.label] = run_log
        if baseline.train.out_dir not in baselines:  # each baseline once, named by its first series
            baselines[baseline.train.out_dir] = baseline
            logs[f"fixed {variant.series}".strip()] = baseline_log
        baseline_summary = summaries["baseline"]
        row = _row(variant, config, summaries[variant.label], baseline_summary, run_log, baseline_log, mix_tolerance)
        paper, paper_full = run_flops(config, PAPER), run_flops(baseline, PAPER)
        row["compute_fraction_paper"] = paper / paper_full
        frontier = frontiers[baseline.train.out_dir]
        fields = multiplier_fields(
            frontier, row["flops"], row["final_val_loss"], paper, paper_full / baseline_summary["flops"]
        )
        rows.append({**row, **fields, "frontier": None if frontier is None else frontier.to_dict()})
    if not main_process():  # under torchrun every rank trained; rank 0 reports
        return rows
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = f"# {name}: {experiment.question}\n\n{format_rows(rows)}\n"
    (folder / "table.md").write_text(table)
    print(table)
    try:
        from depthgrow import plot
    except ImportError:
        print("no plot written: matplotlib is missing (pip install 'depthgrow[plot]')")
    else:
        title = f"{name}: {experiment.question}"
        if experiment.plot == "sweep":
            plot.plot_sweep(rows, folder / "plot.png", title=title, x_label=experiment.x_label, tolerance=mix_tolerance)
        elif experiment.plot == "lr":
            plot.plot_lr(rows, folder / "plot.png", title=title)
        elif experiment.plot == "regime":
            plot.plot_regime(rows, folder / "plot.png", title=title, x_label=experiment.x_label)
        elif experiment.plot == "pareto":
            plot.plot_pareto(rows, folder / "plot.png", title=title)
        elif experiment.plot == "methods":  # the first baseline's frontier, with its shorter runs in grey
            first = next(iter(baselines.values()))
            shorter = {name: read_log(Path(run.train.out_dir) / LOG_NAME) for name, run in _shorter_runs(first, store)}
            frontier = frontiers[first.train.out_dir]
            plot.plot_compare({**logs, **shorter}, folder / "plot.png", title=title, frontier=frontier)
        else:
            plot.plot_compare(logs, folder / "plot.png", title=title)
        print(f"plot: {folder / 'plot.png'}")
    return rows


def run_scaling_experiment(
    base: RunConfig, *, out: str | Path, full: bool, tokens_per_param: float | None, model_given: bool
) -> list[dict[str, Any]]:
    """Train (or reuse) the scaling ladder over ``base`` and write its table, summary and plot to
    ``<out>/scaling``."""
    from depthgrow import scaling

    widths = scaling.FULL_WIDTHS if full else scaling.DEFAULT_WIDTHS
    bases = scaling.family_bases(base, full=full, model_given=model_given)
    rungs = scaling.ladder(bases, widths=widths, tokens_per_param=tokens_per_param)
    store = Path(out) / "runs"
    rows, laws = scaling.run_scaling(
        rungs,
        stored=lambda config, label: stored_run(config, store, label),
        resume_hint=f"the same depthgrow experiment {SCALING} command",
    )
    if not main_process():
        return rows
    folder = Path(out) / SCALING
    table = scaling.write_scaling(rows, laws, folder)
    print(f"# {SCALING}: {SCALING_QUESTION}\n\n{table}\n")
    try:
        from depthgrow.plot import plot_scaling
    except ImportError:
        print("no plot written: matplotlib is missing (pip install 'depthgrow[plot]')")
    else:
        print(f"plot: {plot_scaling(rows, laws, folder / 'plot.png', title=f'{SCALING}: {SCALING_QUESTION}')}")
    return rows


# the shorter fixed-depth runs (fractions of T) that trace each baseline's loss-versus-FLOPs frontier; with
# the baseline itself, four points for the three-parameter law
FRONTIER_FRACTIONS = (0.25, 0.5, 0.75)


def _shorter_runs(baseline: RunConfig, store: Path) -> list[tuple[str, RunConfig]]:
    """The shorter fixed-depth runs of ``baseline`` that trace its frontier, with their labels."""
    runs = []
    for fraction in FRONTIER_FRACTIONS:
        steps = round(fraction * baseline.train.steps)
        if 0 < steps < baseline.train.steps:
            runs.append((f"fixed-T{steps}", stored_run(fixed_depth(baseline, steps, Path()), store, f"fixed-T{steps}")))
    return runs


def _frontier(baseline: RunConfig, summary: dict[str, Any], store: Path, name: str) -> Frontier | None:
    """The fixed-depth frontier of ``baseline``: it and shorter runs of it, each with its own schedule."""
    points = [(summary["flops"], summary["final_val_loss"])]
    for label, shorter in _shorter_runs(baseline, store):
        done = run_or_reuse(shorter, label=label, resume_hint=f"the same depthgrow experiment {name} command")
        if done is None:
            raise KeyboardInterrupt
        points.append((done["flops"], done["final_val_loss"]))
    return fit_frontier(points)


def _row(
    variant: Variant,
    config: RunConfig,
    summary: dict[str, Any],
    baseline: dict[str, Any],
    run_log: list[dict[str, Any]],
    baseline_log: list[dict[str, Any]],
    mix_tolerance: float,
) -> dict[str, Any]:
    growth_step = last_growth_step(run_log)
    curve, reference = eval_curve(run_log), eval_curve(baseline_log)
    mixing = closest = None
    if growth_step is not None:
        mixing = mixing_time(curve, reference, growth_step, mix_tolerance)
        closest = closest_gap(curve, reference, growth_step)
    wall = summary["train_time_s"] + summary["growth_time_s"]
    return {
        "label": variant.label,
        "series": variant.series,
        "x": variant.x,
        "method": config.growth.method,
        "source_depth": config.plan().initial_depth,
        "init": config.plan().init,
        "schedule": config.schedule.name,
        "optimizer": config.optim.name,
        "growth_steps": summary["growth_steps"],
        "final_val_loss": summary["final_val_loss"],
        "baseline_val_loss": baseline["final_val_loss"],
        "gap_pct": 100.0 * (summary["final_val_loss"] / baseline["final_val_loss"] - 1.0),
        "mixing_steps": mixing,
        "closest_gap_pct": closest,
        "flops": summary["flops"],
        "compute_fraction": summary["flops"] / baseline["flops"],
        "wall_fraction": wall / (baseline["train_time_s"] + baseline["growth_time_s"]),
        "run_dir": config.train.out_dir,
    }


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = [
        "variant", "schedule", "optimizer", "grows at step", "final val loss", "baseline", "gap %",
        "closest gap %", "mixed after", "compute fraction (paper)", "wall fraction", "compute-matched loss",
        "compute multiplier",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        mixed = "never" if row["mixing_steps"] is None else f"{row['mixing_steps']} steps"
        cells = [
            row["label"],
            row["schedule"],
            row["optimizer"],
            ", ".join(map(str, row["growth_steps"])),
            f"{row['final_val_loss']:.4f}",
            f"{row['baseline_val_loss']:.4f}",
            f"{row['gap_pct']:+.2f}",
            "-" if row["closest_gap_pct"] is None else f"{row['closest_gap_pct']:+.2f}",
            mixed,
            f"{row['compute_fraction']:.1%} ({row['compute_fraction_paper']:.1%})",
            f"{row['wall_fraction']:.1%}",
            "-" if row["compute_matched_loss"] is None else f"{row['compute_matched_loss']:.4f}",
            multiplier_text(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
