"""The ``depthgrow`` command: ``train``, ``compare``, ``experiment``, ``flops``, ``export`` and ``prepare``.

Every command takes an optional TOML config file and any number of ``--section.key=value`` overrides
(``--growth.at=0.8``, ``--train.steps 2000``), plus the shorthands ``--model NAME`` (a preset),
``--data PATH`` and ``--out DIR``. A user mistake ends with one line on stderr and exit status 2; a run
that stops after it started, with one line and the status of :mod:`depthgrow.errors` (3 diverged,
74 an output could not be written, 130 interrupted).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from depthgrow.analysis import DEFAULT_MIX_TOLERANCE
from depthgrow.config import RunConfig, TrainConfig, load_config
from depthgrow.errors import INTERRUPTED_STATUS, DepthgrowError
from depthgrow.flops import DEPTHGROW, PAPER, compare_compute
from depthgrow.presets import PRESETS
from depthgrow.schedule import growth_plan
from depthgrow.trainer import CONFIG_NAME, train

SHORTHANDS = {"model": "model.preset", "data": "data.path", "out": "train.out_dir"}


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separate ``--section.key[=value]`` options (and their values) from the other arguments."""
    rest: list[str] = []
    overrides: dict[str, str] = {}
    index = 0
    while index < len(argv):
        arg = argv[index]
        key, has_value, value = arg[2:].partition("=")
        if arg.startswith("--") and "." in key:
            if not has_value:
                if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
                    raise DepthgrowError(f"option --{key} needs a value")
                index += 1
                value = argv[index]
            overrides[key] = value
        else:
            rest.append(arg)
        index += 1
    return rest, overrides


def _config(args: argparse.Namespace, overrides: dict[str, str], *, default_out: str | None = None) -> RunConfig:
    overrides = dict(overrides)
    for flag, key in SHORTHANDS.items():
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    config = load_config(args.config, overrides)
    if default_out is not None and "train.out_dir" not in overrides and config.train.out_dir == TrainConfig().out_dir:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=default_out))
    return config


def cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    if args.resume is not None and args.resume is not True:
        run_dir = Path(args.resume)
        run_dir = run_dir.parent if run_dir.is_file() else run_dir
        if not (run_dir / CONFIG_NAME).exists():
            raise DepthgrowError(f"no run to resume in {run_dir}: it has no {CONFIG_NAME}")
        if args.config is None:
            args.config = str(run_dir / CONFIG_NAME)
        overrides = {**overrides, "train.out_dir": str(run_dir)}
    config = _config(args, overrides)
    result = train(config, resume=args.resume is not None, overwrite=args.overwrite, stop_at=args.stop_at)
    if not result.is_main:  # under torchrun, rank 0 reports
        return 0 if result.finished or result.state.step == args.stop_at else INTERRUPTED_STATUS
    if result.finished:
        print(
            f"final validation loss {result.final_val_loss:.4f} after {result.state.step} steps; "
            f"outputs in {result.out_dir}"
        )
        return 0
    if args.stop_at is not None and result.state.step == args.stop_at:
        print(f"stopped at step {args.stop_at}; resume with: depthgrow train --resume {result.out_dir}")
        return 0
    return INTERRUPTED_STATUS


def cmd_compare(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from depthgrow.compare import compare

    _check_mix_tolerance(args.mix_tolerance)
    config = _config(args, overrides, default_out="runs/compare")
    compare(config, sources=args.sources, overwrite=args.overwrite, mix_tolerance=args.mix_tolerance)
    return 0


def _check_mix_tolerance(tolerance: float) -> None:
    if not 0.0 <= tolerance < float("inf"):
        raise DepthgrowError(f"--mix-tolerance must be a finite fraction >= 0, got {tolerance}")


def cmd_flops(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    config = _config(args, overrides)
    model, train_config = config.model, config.train
    sources = [config.growth.source_depth] if config.growth.source_depth is not None else [0, 1][: model.n_layer]
    units_per_step = train_config.batch_size * model.units_per_example()
    print(
        f"{config.model_preset or model.family}: {model.n_layer} layers, {model.num_params() / 1e6:,.2f}M parameters; "
        f"T = {train_config.steps} steps of {units_per_step} {model.unit}s"
    )
    header = f"{'counting':<10} {'growth':<22} {'N small':>10} {'N large':>10} {'fixed FLOPs':>12} "
    header += f"{'progr. FLOPs':>12} {'fraction':>9} {'speedup':>8}"
    print(header)
    for source in sources:
        plan = growth_plan(
            source_depth=source,
            via=config.growth.via,
            at=config.growth.at,
            target_depth=model.n_layer,
            total_steps=train_config.steps,
        )
        chain = " -> ".join(map(str, plan.depths)) + " at " + ", ".join(map(str, plan.steps))
        for counting in (DEPTHGROW, PAPER):
            c = compare_compute(
                model,
                plan,
                total_steps=train_config.steps,
                units_per_step=units_per_step,
                counting=counting,
            )
            print(
                f"{counting.name:<10} {chain:<22} {c.params_small / 1e6:>9.2f}M {c.params_large / 1e6:>9.2f}M "
                f"{c.flops_fixed:>12.3e} {c.flops_progressive:>12.3e} {c.fraction:>9.1%} {c.speedup:>7.2f}x"
            )
    print(
        "N: parameters used per token. depthgrow counting: the matmuls of every token (block weights, LM head) "
        "and the attention scores; paper: 6 x N"
    )
    return 0


def cmd_experiment(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from depthgrow.experiments import EXPERIMENTS, experiment_base, run_experiment

    _check_mix_tolerance(args.mix_tolerance)
    overrides = {**overrides, **{key: getattr(args, flag) for flag, key in SHORTHANDS.items() if getattr(args, flag)}}
    overrides.pop("train.out_dir", None)  # --out is the results folder; every run gets its own folder in it
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    for name in names:
        base = experiment_base(name, config_path=args.config, overrides=overrides, full=args.full)
        run_experiment(name, base, out=args.out or "results", full=args.full, mix_tolerance=args.mix_tolerance)
    return 0


def cmd_export(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from depthgrow.export import export_checkpoint

    if overrides:
        raise DepthgrowError(f"export takes no config options, got --{next(iter(overrides))}")
    out_dir = export_checkpoint(args.source, args.out_dir, overwrite=args.overwrite)
    print(f"exported {args.source} to {out_dir} as a Hugging Face model folder (model card: {out_dir}/README.md)")
    print(f'load it with: transformers.AutoModelForCausalLM.from_pretrained("{out_dir}")')
    return 0


def cmd_prepare(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from depthgrow.prepare import hf_documents, prepare, text_documents

    if overrides:
        raise DepthgrowError(f"prepare takes no config options, got --{next(iter(overrides))}")
    if bool(args.sources) == bool(args.hf_dataset):
        raise DepthgrowError("prepare takes text files or folders, or --hf-dataset NAME: one of the two")
    if args.hf_dataset:
        documents, total = hf_documents(
            args.hf_dataset,
            config_name=args.hf_config,
            split=args.hf_split,
            data_files=args.hf_data_files,
            text_field=args.hf_text_field,
        )
    else:
        documents, total = text_documents(args.sources)
    summary = prepare(
        documents,
        args.out,
        tokenizer=args.tokenizer,
        bpe_file=args.bpe_file,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        prefix=args.prefix,
        overwrite=args.overwrite,
        total=total,
    )
    print("\n".join(summary.lines()))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, dict[str, str]], int]] = {
    "train": cmd_train,
    "compare": cmd_compare,
    "flops": cmd_flops,
    "experiment": cmd_experiment,
    "export": cmd_export,
    "prepare": cmd_prepare,
}


class _Parser(argparse.ArgumentParser):
    """argparse's errors as every other bad input: one line (no usage lines before it), exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise DepthgrowError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="depthgrow",
        description="Progressive depth training: train a zero/one-layer model, grow it once, finish at full depth.",
        epilog="Config options: --section.key=value for any key of the sections model, data, optim, schedule, "
        "growth, train (e.g. --growth.source_depth=0 --growth.at=0.8 --train.steps=2000).",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        sub.add_argument("config", nargs="?", help="a TOML run config (defaults apply to what it leaves out)")
        sub.add_argument("--model", help=f"model preset: {', '.join(PRESETS)}")
        sub.add_argument(
            "--data", help="text file, folder of text files, or folder with train.bin/val.bin or token shards"
        )
        sub.add_argument("--out", help="output folder (train.out_dir)")
        return sub

    train_parser = command("train", "train one run, growing as growth.* says")
    train_parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (default: train.out_dir) from its checkpoint",
    )
    train_parser.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    train_parser.add_argument("--stop-at", type=int, metavar="STEP", help="stop with a checkpoint after STEP steps")

    compare_parser = command(
        "compare",
        "train the fixed-depth baseline and zero/one-layer progressive runs, then tabulate and plot",
    )
    compare_parser.add_argument(
        "--sources",
        type=_depth_list,
        default=[0, 1],
        metavar="DEPTHS",
        help="source depths of the progressive runs, comma-separated (default 0,1)",
    )
    compare_parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace runs of another config in the output folder (runs of the same config are always reused)",
    )
    _mix_tolerance_option(compare_parser)

    command("flops", "print parameters, FLOPs, compute fraction and speedup of a growth plan")

    from depthgrow.experiments import EXPERIMENTS

    experiment_parser = commands.add_parser(
        "experiment",
        help="run one of the paper's ablations (or all) and write its table and plot",
        description="Run an ablation: " + "; ".join(f"{e.name}: {e.question}" for e in EXPERIMENTS.values()),
        allow_abbrev=False,
    )
    experiment_parser.add_argument("name", choices=[*EXPERIMENTS, "all"], help="the experiment")
    experiment_parser.add_argument("config", nargs="?", help="a TOML base config (default: the compare recipe)")
    experiment_parser.add_argument("--model", help="model preset of the base recipe")
    experiment_parser.add_argument("--data", help="data of the base recipe")
    experiment_parser.add_argument("--out", help="results folder (default: results)")
    experiment_parser.add_argument("--full", action="store_true", help="the larger grid, closer to the paper's")
    _mix_tolerance_option(experiment_parser)

    export_help = "write a run's model as a Hugging Face transformers folder (config.json, model.safetensors)"
    export_parser = commands.add_parser("export", help=export_help, description=export_help, allow_abbrev=False)
    export_parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="a run folder or its checkpoint.pt")
    export_parser.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (created if missing)")
    export_parser.add_argument("--overwrite", action="store_true", help="export into OUT_DIR even if it is not empty")
    _prepare_parser(commands)
    return parser


def _prepare_parser(commands: argparse._SubParsersAction) -> None:
    from depthgrow.prepare import DEFAULT_PREFIX, DEFAULT_SHARD_TOKENS

    help_text = "tokenise text files, folders or a Hugging Face dataset into token shards for --data"
    parser = commands.add_parser("prepare", help=help_text, description=help_text, allow_abbrev=False)
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help="text files or folders of text files")
    parser.add_argument("--out", required=True, help="the folder to write the shards to (created if missing)")
    parser.add_argument("--tokenizer", choices=["byte", "gpt2"], default="byte", help="byte (default) or gpt2")
    parser.add_argument("--bpe-file", help="gpt2.tiktoken for --tokenizer gpt2 (or set DEPTHGROW_GPT2_BPE)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="FRACTION",
        help="the tail of every document held out for validation (default 0.1)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        metavar="N",
        help=f"tokens per shard at most (default {DEFAULT_SHARD_TOKENS:_})",
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"shard name prefix (default {DEFAULT_PREFIX})")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty output folder")
    hf = parser.add_argument_group("Hugging Face datasets (extra hf)")
    hf.add_argument("--hf-dataset", metavar="NAME", help="a Hub dataset, local dataset folder, data file or builder")
    hf.add_argument("--hf-config", metavar="NAME", help="the dataset's configuration (e.g. sample-10BT)")
    hf.add_argument("--hf-split", default="train", metavar="SPLIT", help="the split to read (default train)")
    hf.add_argument(
        "--hf-data-files", nargs="+", default=[], metavar="FILE", help="data files for a builder such as json"
    )
    hf.add_argument("--hf-text-field", default="text", metavar="COLUMN", help="the text column (default text)")


def _mix_tolerance_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mix-tolerance",
        type=float,
        default=DEFAULT_MIX_TOLERANCE,
        metavar="FRACTION",
        help="a progressive run has mixed once its validation loss is within this fraction of the "
        f"baseline's at the same step (default {DEFAULT_MIX_TOLERANCE})",
    )


def _depth_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated depths, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = split_overrides(argv)
        args, unknown = build_parser().parse_known_args(rest)
        if unknown:
            raise DepthgrowError(f"unrecognized arguments: {' '.join(unknown)} (see depthgrow {args.command} --help)")
        return COMMANDS[args.command](args, overrides)
    except DepthgrowError as error:
        print(f"depthgrow: error: {error}", file=sys.stderr)
        return error.exit_status
    except OSError as error:  # a file or folder the user named cannot be read or written
        where = f"{error.filename}: " if error.filename else ""
        print(f"depthgrow: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
