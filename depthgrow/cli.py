"""The ``depthgrow`` command: ``train``, ``compare``, ``flops``, ``experiment``, ``plan``, ``generate``, ``plot``,
``export`` and ``prepare``.

The commands that train or count a run config (``train``, ``compare``, ``flops``, ``experiment``) take an
optional TOML config file and any number of ``--section.key=value`` overrides (``--growth.at=0.8``,
``--train.steps 2000``), plus the shorthands ``--model NAME`` (a preset), ``--data PATH`` and ``--out DIR``
where the command reads them; their ``--help`` lists every key with its default. A user mistake ends with
one line on stderr and exit status 2; a run that stops after it started, with one line and the status of
:mod:`depthgrow.errors` (3 diverged, 74 an output could not be written, 130 interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from depthgrow.analysis import DEFAULT_MIX_TOLERANCE
from depthgrow.config import PRESET_RULE, RunConfig, TrainConfig, config_keys, load_config
from depthgrow.distributed import joined, main_process
from depthgrow.errors import INTERRUPTED_STATUS, DepthgrowError
from depthgrow.flops import DEPTHGROW, PAPER, compare_compute
from depthgrow.presets import PRESETS
from depthgrow.trainer import CONFIG_NAME, resolve_device, train

SHORTHANDS = {"model": "model.preset", "data": "data.path", "out": "train.out_dir"}
COMPARE_OUT = "runs/compare"  # compare's default output folder
# config keys a command sets itself: given on its command line they would be ignored, so they are refused (a
# config file may hold them, as one file serves every command)
SET_BY_COMMAND: dict[str, dict[str, str]] = {
    "compare": {"growth.source_depth": "it is set for each run from --sources"},
    "experiment": {
        **dict.fromkeys(("growth.source_depth", "growth.at", "growth.init"), "every variant of an experiment sets it"),
        "train.out_dir": "every run gets its own folder under --out",
    },
}
HELP_WIDTH = 100  # of the config keys and experiments that --help lists, laid out beforehand
MODEL_HELP = f"model preset (model.preset): {', '.join(PRESETS)}; {PRESET_RULE}"


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


def _auto_at(overrides: dict[str, str]) -> tuple[dict[str, str], bool]:
    """The overrides without growth.at=auto, and whether it was given (it is resolved once the config is)."""
    if overrides.get("growth.at", "").strip().lower() != "auto":
        return overrides, False
    return {key: value for key, value in overrides.items() if key != "growth.at"}, True


def _calibrated(config: RunConfig, path: str, source_depth: int | None) -> RunConfig:
    from depthgrow.calibrate import calibrated_step

    step = calibrated_step(path, source_depth=source_depth, steps=config.train.steps)
    print(f"growth.at=auto: step {step}, from {path}")
    return config.with_overrides({"growth.at": str(step)})


def cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    if args.resume is not None and args.resume is not True:
        run_dir = Path(args.resume)
        run_dir = run_dir.parent if run_dir.is_file() else run_dir
        if not (run_dir / CONFIG_NAME).exists():
            raise DepthgrowError(f"no run to resume in {run_dir}: it has no {CONFIG_NAME}")
        if args.config is None:
            args.config = str(run_dir / CONFIG_NAME)
        elsewhere = args.out or overrides.get("train.out_dir")
        if elsewhere is not None and Path(elsewhere).resolve() != run_dir.resolve():
            raise DepthgrowError(
                f"--resume {args.resume} continues the run in {run_dir}, and {elsewhere} is another folder: "
                "a run resumes where it was written, so drop --out (copy the folder first to branch it)"
            )
        overrides = {**overrides, "train.out_dir": str(run_dir)}
    overrides, auto = _auto_at(overrides)
    config = _config(args, overrides)
    if auto:
        config = _calibrated(config, args.calibration, config.growth.source_depth)
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
    overrides, auto = _auto_at(overrides)
    config = _config(args, overrides, default_out=COMPARE_OUT)
    sources = args.sources
    if sources is None:  # gstack and midas derive their source depth; the paper grows from 0 and 1
        sources = [config.plan().initial_depth] if config.growth.method in ("gstack", "midas") else [0, 1]
    if auto:
        if len(sources) != 1:
            raise DepthgrowError("growth.at=auto calibrates one source depth: give it alone, e.g. --sources 0")
        config = _calibrated(config, args.calibration, sources[0])
    with joined_for(config):  # under torchrun, every run of the comparison on the same processes
        compare(config, sources=sources, overwrite=args.overwrite, mix_tolerance=args.mix_tolerance)
    return 0


def joined_for(config: RunConfig) -> contextlib.AbstractContextManager:
    """The process group held across a command's runs, as their config asks (a no-op in one process)."""
    return joined(config.train.parallel, config.train.device, config.train.batch_size)


def _check_mix_tolerance(tolerance: float) -> None:
    if not 0.0 <= tolerance < float("inf"):
        raise DepthgrowError(f"--mix-tolerance must be a finite fraction >= 0, got {tolerance}")


def cmd_calibrate(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from depthgrow.calibrate import calibrate, calibration_lines, write_calibration
    from depthgrow.experiments import stored_run

    _check_mix_tolerance(args.mix_tolerance)
    config = _config(args, overrides)
    out = Path(args.out)
    with joined_for(config):
        result = calibrate(
            config,
            pilots=tuple(args.pilots),
            tolerance=args.mix_tolerance,
            stored=lambda run, label: stored_run(run, out / "runs", label),
            resume_hint="the same depthgrow calibrate command",
        )
    if not main_process():
        return 0
    print("\n".join(calibration_lines(result)))
    path = write_calibration(result, out)
    print(f"written to {path}; train with --growth.at auto --calibration {path}")
    return 0


def cmd_flops(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    config = _config(args, overrides)
    model, train_config = config.model, config.train
    growth = config.growth
    # a fixed-depth config counts the paper's two sources, at its expansion times; any other its own plan
    fixed = growth.method == "bu" and growth.source_depth is None
    sources = [0, 1][: model.n_layer] if fixed else [growth.source_depth]
    plans = [dataclasses.replace(config, growth=dataclasses.replace(growth, source_depth=s)).plan() for s in sources]
    units_per_step = train_config.batch_size * model.units_per_example()
    print(
        f"{config.model_preset or model.family}: {model.n_layer} layers, {model.num_params() / 1e6:,.2f}M parameters; "
        f"T = {train_config.steps} steps of {units_per_step} {model.unit}s"
    )
    header = f"{'counting':<10} {'growth':<22} {'N small':>10} {'N large':>10} {'fixed FLOPs':>12} "
    header += f"{'progr. FLOPs':>12} {'fraction':>9} {'speedup':>8}"
    print(header)
    for plan in plans:
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
    from depthgrow.experiments import NAMES, SCALING, experiment_base, run_experiment, run_scaling_experiment

    _check_mix_tolerance(args.mix_tolerance)
    if args.tokens_per_param is not None and args.name not in (SCALING, "all"):
        raise DepthgrowError(f"--tokens-per-param is for the {SCALING} experiment, not {args.name}")
    # --out is the results folder, not train.out_dir: every run gets its own folder in it
    given = {key: getattr(args, flag) for flag, key in SHORTHANDS.items() if flag != "out" and getattr(args, flag)}
    overrides = {**overrides, **given}
    names = list(NAMES) if args.name == "all" else [args.name]
    bases = {
        name: experiment_base(name, config_path=args.config, overrides=overrides, full=args.full) for name in names
    }
    out = args.out or "results"
    with joined_for(next(iter(bases.values()))):  # under torchrun, every run on the same processes
        for name, base in bases.items():
            if name == SCALING:
                model_given = "model.preset" in overrides or "model.family" in overrides
                run_scaling_experiment(
                    base, out=out, full=args.full, tokens_per_param=args.tokens_per_param, model_given=model_given
                )
            else:
                run_experiment(name, base, out=out, full=args.full, mix_tolerance=args.mix_tolerance)
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


def cmd_generate(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import torch

    from depthgrow.sampling import generate, load_run, stream_text

    if overrides:
        raise DepthgrowError(f"generate takes no config options, got --{next(iter(overrides))}")
    if args.max_new_tokens < 1:
        raise DepthgrowError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0.0 <= args.temperature < float("inf"):
        raise DepthgrowError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise DepthgrowError(f"--top-k must be >= 1, got {args.top_k}")
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    run = load_run(args.run, device=device)
    tokenizer = run.tokenizer
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        if tokenizer.end_of_text is None:
            raise DepthgrowError("--prompt is empty, and a byte vocabulary has no end-of-text token to start from")
        prompt = [tokenizer.end_of_text]  # an empty prompt: a new document
    tokens = generate(
        run.model,
        prompt,
        max_new_tokens=args.max_new_tokens,
        block_size=run.model_config.block_size,
        vocab_size=tokenizer.vocab_size,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        stop=tokenizer.end_of_text,
    )
    print(args.prompt, end="", flush=True)
    for piece in stream_text(tokenizer.decode, tokens):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_plot(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from depthgrow.metrics import LOG_NAME, read_log

    if overrides:
        raise DepthgrowError(f"plot takes no config options, got --{next(iter(overrides))}")
    logs: dict[str, list[dict]] = {}
    for run in map(Path, args.runs):
        folder = run.parent if run.is_file() else run
        if not (folder / LOG_NAME).is_file():
            raise DepthgrowError(f"{folder} holds no run: it has no {LOG_NAME}")
        records = read_log(folder / LOG_NAME)
        if not any(r["event"] == "eval" for r in records):
            raise DepthgrowError(f"{folder} has no evaluation to plot yet")
        logs[folder.name if folder.name not in logs else str(folder)] = records
    try:
        from depthgrow.plot import plot_compare
    except ImportError:
        raise DepthgrowError("plot needs matplotlib: pip install 'depthgrow[plot]'") from None
    out = Path(args.out) if args.out else Path(args.runs[0]) / "loss.png" if len(logs) == 1 else Path("loss.png")
    title = f"validation loss of {', '.join(logs)}"
    print(f"plot: {plot_compare(logs, out, title=title)}")
    return 0


def cmd_plan(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from depthgrow.planner import plan_lines

    config = _config(args, overrides)
    print("\n".join(plan_lines(config, tokens=args.tokens, flops=args.flops, results=args.results)))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, dict[str, str]], int]] = {
    "train": cmd_train,
    "compare": cmd_compare,
    "flops": cmd_flops,
    "calibrate": cmd_calibrate,
    "experiment": cmd_experiment,
    "export": cmd_export,
    "generate": cmd_generate,
    "plot": cmd_plot,
    "plan": cmd_plan,
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
        "growth, train (e.g. --growth.source_depth=0 --growth.at=0.8 --train.steps=2000); depthgrow COMMAND --help "
        "lists every key with its default and its meaning.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help_text: str, defaults: RunConfig, *, details: str = "", paths: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=_wrapped(help_text + details),
            epilog=_config_epilog(name, defaults),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        sub.add_argument("config", nargs="?", help="a TOML run config (defaults apply to what it leaves out)")
        sub.add_argument("--model", help=MODEL_HELP)
        if paths:
            sub.add_argument(
                "--data",
                help="data.path: a text file, folder of text files, or folder with train.bin/val.bin or token shards",
            )
            sub.add_argument("--out", help="output folder (train.out_dir)")
        return sub

    defaults = load_config()
    train_parser = command("train", "train one run, growing as growth.* says", defaults)
    train_parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (default: train.out_dir) from its checkpoint",
    )
    train_parser.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    train_parser.add_argument("--stop-at", type=int, metavar="STEP", help="stop with a checkpoint after STEP steps")
    _calibration_option(train_parser)

    compare_parser = command(
        "compare",
        "train the fixed-depth baseline and zero/one-layer progressive runs, then tabulate and plot",
        load_config(None, {"train.out_dir": COMPARE_OUT}),
    )
    compare_parser.add_argument(
        "--sources",
        type=_int_list,
        default=None,
        metavar="DEPTHS",
        help="source depths of the progressive runs, comma-separated (default 0,1; gstack and midas: the one they "
        "derive, n_layer / growth.stack_factor)",
    )
    compare_parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace runs of another config in the output folder (runs of the same config are always reused)",
    )
    _mix_tolerance_option(compare_parser)
    _calibration_option(compare_parser)
    calibrate_help = "the paper's pilot for the expansion time: measure mixing, recommend tau = T - t_mix"
    calibrate_parser = commands.add_parser(
        "calibrate", help=calibrate_help, description=calibrate_help, allow_abbrev=False
    )
    calibrate_parser.add_argument("config", nargs="?", help="a TOML run config (the target run: its T, source)")
    calibrate_parser.add_argument("--model", help=MODEL_HELP)
    calibrate_parser.add_argument("--data", help="data.path of the target run")
    calibrate_parser.add_argument("--out", default="results/calibrate", help="pilots and calibration.json go here")
    calibrate_parser.add_argument(
        "--pilots",
        type=_int_list,
        default=[500, 1000],
        metavar="STEPS",
        help="the pilots' horizons, comma-separated (default 500,1000: two measure how t_mix grows with T)",
    )
    _mix_tolerance_option(calibrate_parser)

    command(
        "flops",
        "print parameters, FLOPs, compute fraction and speedup of a growth plan",
        defaults,
        details=" (it counts from the model, growth.source_depth, growth.via, growth.at, train.steps and "
        "train.batch_size; the other keys are checked but change nothing)",
        paths=False,  # it reads no data and writes nothing
    )

    from depthgrow.experiments import DEFAULT_GRID, NAMES

    experiment_parser = commands.add_parser(
        "experiment",
        help="run one of the paper's ablations (or all) and write its table and plot",
        description=_experiment_description(),
        epilog=_config_epilog("experiment", load_config(None, DEFAULT_GRID)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    experiment_parser.add_argument(
        "name", choices=[*NAMES, "all"], metavar="NAME", help=f"the experiment: {', '.join(NAMES)}, or all"
    )
    experiment_parser.add_argument("config", nargs="?", help="a TOML base config (default: the compare recipe)")
    experiment_parser.add_argument("--model", help=f"the base recipe's {MODEL_HELP}")
    experiment_parser.add_argument("--data", help="data of the base recipe")
    experiment_parser.add_argument("--out", help="results folder (default: results)")
    experiment_parser.add_argument("--full", action="store_true", help="the larger grid, closer to the paper's")
    experiment_parser.add_argument(
        "--tokens-per-param",
        type=float,
        metavar="RATIO",
        help="scaling: training tokens per parameter of every size (default: the paper's 50, MoE 100)",
    )
    _mix_tolerance_option(experiment_parser)

    export_help = "write a run's model as a Hugging Face transformers folder (config.json, model.safetensors)"
    export_parser = commands.add_parser("export", help=export_help, description=export_help, allow_abbrev=False)
    export_parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="a run folder or its checkpoint.pt")
    export_parser.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (created if missing)")
    export_parser.add_argument("--overwrite", action="store_true", help="export into OUT_DIR even if it is not empty")
    _generate_parser(commands)
    plan_help = "predict what growth saves on a model and budget, from the laws the scaling experiment stored"
    plan_parser = commands.add_parser("plan", help=plan_help, description=plan_help, allow_abbrev=False)
    plan_parser.add_argument("config", nargs="?", help="a TOML run config (its model and batch)")
    plan_parser.add_argument("--model", help=MODEL_HELP)
    budget = plan_parser.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=float, metavar="N", help="the training budget in tokens")
    budget.add_argument("--flops", type=float, metavar="C", help="the training budget in FLOPs (depthgrow counting)")
    plan_parser.add_argument(
        "--results", default="results", help="where experiment scaling wrote its runs (default: results)"
    )
    plot_help = "draw runs' validation loss against step and against FLOPs, expansions marked"
    plot_parser = commands.add_parser("plot", help=plot_help, description=plot_help, allow_abbrev=False)
    plot_parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with its log.jsonl)")
    plot_parser.add_argument("--out", help="the image to write (default: RUN_DIR/loss.png for one run, else loss.png)")
    _prepare_parser(commands)
    return parser


def _generate_parser(commands: argparse._SubParsersAction) -> None:
    help_text = "continue a prompt with a trained run's model, streaming the text (greedy at temperature 0)"
    parser = commands.add_parser("generate", help=help_text, description=help_text, allow_abbrev=False)
    parser.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT", help="a run folder or its checkpoint.pt")
    parser.add_argument("--prompt", default="", help="the text to continue (default: empty, a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to add (default 200)")
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)"
    )
    parser.add_argument("--top-k", type=int, default=200, metavar="K", help="sample among the K likeliest (200)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling generator's seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")


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


def _calibration_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calibration",
        default="results/calibrate/calibration.json",
        metavar="FILE",
        help="what --growth.at auto reads: the step depthgrow calibrate recommends (default: %(default)s)",
    )


def _mix_tolerance_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mix-tolerance",
        type=float,
        default=DEFAULT_MIX_TOLERANCE,
        metavar="FRACTION",
        help="a progressive run has mixed once its validation loss is within this fraction of the "
        f"baseline's at the same step (default {DEFAULT_MIX_TOLERANCE})",
    )


def _config_epilog(command: str, defaults: RunConfig) -> str:
    """Every config key with its default under ``command`` (``defaults``) and its doc, a section at a time."""
    set_by_command = SET_BY_COMMAND.get(command, {})
    intro = _wrapped(
        "config keys, given as --section.key=value (a list comma-separated: --growth.at=0.4,0.8) or under [section] "
        f"in the TOML config; the defaults are those of depthgrow {command}:"
    )
    model_heading = (
        f"model: the keys of {defaults.model.family} (the family of {defaults.model_preset}), then those only other "
        "families have (defaults: their presets'):"
    )
    rows: list[tuple[str, ...]] = []
    for section, keys in itertools.groupby(config_keys(defaults), lambda key: key.key.partition(".")[0]):
        rows.append((model_heading if section == "model" else f"{section}:",))
        for key in keys:
            if key.key in set_by_command:
                rows.append((key.key, "-", f"not taken: {set_by_command[key.key]}"))
            else:
                rows.append((key.key, key.default, key.doc))
    return "\n".join([intro, *_columns(rows)])


VALUE_WIDTH = 14  # a wider value (a long list of families) puts its row's text on the next line


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    """``rows`` as lines of left-aligned columns; the last column wraps at HELP_WIDTH. A row of one cell is a
    heading, set apart by an empty line."""
    columns = [row for row in rows if len(row) > 1]
    widths = [max(len(row[i]) for row in columns) for i in range(len(columns[0]) - 1)]
    widths[1:] = [min(width, VALUE_WIDTH) for width in widths[1:]]
    indent = " " * (2 + sum(width + 2 for width in widths))
    lines = []
    for *cells, text in rows:
        if not cells:
            lines += ["", _wrapped(text)]
            continue
        lead = "  " + "".join(f"{cell:<{width}}  " for cell, width in zip(cells, widths, strict=True))
        if len(lead) > len(indent):  # a cell wider than its column: the text starts on the next line, as argparse's
            lines.append(lead.rstrip())
            lead = indent
        lines += textwrap.wrap(
            text,
            HELP_WIDTH,
            initial_indent=lead,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
    return lines


def _wrapped(text: str) -> str:
    return textwrap.fill(text, HELP_WIDTH, break_long_words=False, break_on_hyphens=False)


def _experiment_description() -> str:
    from depthgrow.experiments import DEFAULT_GRID, EXPERIMENTS, SCALING, SCALING_QUESTION

    grid = ", ".join(f"{key}={value}" for key, value in DEFAULT_GRID.items())
    intro = _wrapped(
        "Run one of the paper's ablations (or all) on a base recipe, the compare recipe with "
        f"{grid} (--full: the recipe's length and a larger grid), and write its table.md, summary.json and "
        "plot.png under --out. Each variant sets its growth (and what the experiment varies) over the base, and "
        'is measured against fixed-depth runs of its own config. Each experiment asks a question; "the paper: '
        "...\" is the paper's answer, a claim: docs/results.md has what the runs measured at small scale, where "
        "several of the paper's claims did not hold."
    )
    rows = []
    for e in EXPERIMENTS.values():
        base = ", ".join(f"{key}={value}" for key, value in e.base(False).items())
        rows.append((e.name, f"{e.question} (base: {base})" if base else e.question))
    ladder = "a ladder of widths of gpt2-micro-bpe and llama-micro-bpe (--full: and moe-micro-bpe), or of --model"
    rows.append((SCALING, f"{SCALING_QUESTION} ({ladder})"))
    return "\n".join([intro, "", *_columns(rows)])


def _refuse_keys_set_by_command(command: str, overrides: dict[str, str]) -> None:
    for key in overrides:
        section, _, name = key.partition(".")
        why = SET_BY_COMMAND.get(command, {}).get(f"{section}.{name.replace('-', '_')}")
        if why is not None:
            raise DepthgrowError(f"{command} does not take --{key}: {why}")


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = split_overrides(argv)
        args, unknown = build_parser().parse_known_args(rest)
        if unknown:
            raise DepthgrowError(f"unrecognized arguments: {' '.join(unknown)} (see depthgrow {args.command} --help)")
        _refuse_keys_set_by_command(args.command, overrides)
        if main_process():
            return COMMANDS[args.command](args, overrides)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # rank 0 reports
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
