"""What the trainer costs over a hand-written loop, and what a growth costs against a training step.

    python benchmarks/throughput.py                       # gpt2-micro, llama-micro, moe-micro (~20 min here)
    python benchmarks/throughput.py --models gpt2-micro --rounds 5

For each model at depth 0, 1 and its full depth it times, interleaved round by round (so that drift of
the machine's speed falls on both alike):

- **plain**: a minimal PyTorch loop over the same model config, optimizer, schedule and batches as
  `depthgrow train` (set the learning rate, forward, loss, backward, step, zero the gradients; no logging);
- **trainer**: `depthgrow.train` itself, everything it does per step included (the all-reduce of the loss,
  the per-step log record, the divergence guard, the progress display). Its per-step time is the
  difference between a long and a short run of the same config divided by the steps between them, so that
  start-up, the evaluations at step 0 and at the end and the final checkpoint cancel out.

Separate runs on a shared machine drift by more than the trainer's overhead, so it also prints the
trainer's **bookkeeping** per step measured within its own runs: wall time minus the time inside training
steps (the run's ``train_time_s``), differenced between the long and the short run, and its share of a
step. It prints tokens per second of both, their ratio (goal: >= 0.95), and for each model the time the
trainer's growth from one layer to full depth took (the `growth` record's `seconds`: unwrapping, `grow`,
the new optimizer) against one plain step of the grown model (goal: shorter than a step).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from depthgrow import build_model, build_optimizer, load_config, train
from depthgrow.config import RunConfig
from depthgrow.data import make_batches
from depthgrow.metrics import LOG_NAME, read_log
from depthgrow.schedule import lr_multiplier
from depthgrow.trainer import loss_fn

MODELS = ("gpt2-micro", "llama-micro", "moe-micro")


def recipe(preset: str, depth: int, steps: int, out_dir: Path, **more: str) -> RunConfig:
    return load_config(
        None,
        {
            "model.preset": preset,
            "model.n_layer": str(depth),
            "train.steps": str(steps),
            "train.eval_every": str(steps),
            "train.eval_batches": "1",
            "train.checkpoint_every": str(steps),
            "train.out_dir": str(out_dir),
            **more,
        },
    )


def plain_seconds_per_step(config: RunConfig, steps: int) -> float:
    """The mean time of a step of a minimal loop (after two warm-up steps)."""
    model = build_model(config.model, seed=config.train.seed)
    optimizer = build_optimizer(model, config.optim)
    batches = make_batches(
        config.model, config.data, batch_size=config.train.batch_size, eval_batches=1, seed=config.train.seed
    )
    model.train()
    started = 0.0
    for step in range(steps + 2):
        if step == 2:
            started = time.perf_counter()
        optimizer.set_lr_multiplier(lr_multiplier(step, config.train.steps, config.schedule))
        x, y = batches.train_batch(step)
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps


def trainer_seconds(config: RunConfig) -> tuple[float, float]:
    """The wall time of a whole `depthgrow train` run of ``config`` (its output silenced), and the part of
    it spent inside training steps (the run's own ``train_time_s``)."""
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        started = time.perf_counter()
        result = train(config, overwrite=True)
        seconds = time.perf_counter() - started
    if not result.finished:  # Ctrl-C or SIGTERM stopped the run (with a checkpoint): stop the benchmark too
        raise SystemExit("interrupted")
    return seconds, result.state.train_time_s


def measure(preset: str, depth: int, rounds: int, short: int, long: int, folder: Path) -> dict[str, float]:
    """Medians over the rounds, per step: the plain loop's time, the trainer's time, and the trainer's
    bookkeeping around its steps (log record, guard, progress display; measured within its own runs, so
    free of the machine's drift between runs)."""
    plain, trainer, bookkeeping, inside = [], [], [], []
    for _ in range(rounds):
        plain.append(plain_seconds_per_step(recipe(preset, depth, long, folder / "plain"), long - short))
        long_wall, long_steps = trainer_seconds(recipe(preset, depth, long, folder / "long"))
        short_wall, short_steps = trainer_seconds(recipe(preset, depth, short, folder / "short"))
        trainer.append((long_wall - short_wall) / (long - short))
        bookkeeping.append(((long_wall - long_steps) - (short_wall - short_steps)) / (long - short))
        inside.append(long_steps / long)
    return {
        "plain": statistics.median(plain),
        "trainer": statistics.median(trainer),
        "bookkeeping": statistics.median(bookkeeping),
        "inside": statistics.median(inside),
    }


def growth_seconds(preset: str, depth: int, steps: int, folder: Path) -> float:
    """The seconds the trainer's growth 1 -> ``depth`` took, from its log."""
    config = recipe(preset, depth, steps, folder / "grow", **{"growth.source_depth": "1", "growth.at": str(steps // 2)})
    trainer_seconds(config)
    return next(r["seconds"] for r in read_log(folder / "grow" / LOG_NAME) if r["event"] == "growth")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated presets")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration (median)")
    parser.add_argument("--steps", type=int, default=400, help="steps of the long trainer run (the short: a quarter)")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    short = args.steps // 4
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} interleaved rounds")
    print(
        f"{'model':<12} {'depth':>5} {'plain tok/s':>12} {'trainer tok/s':>14} {'ratio':>6} "
        f"{'bookkeeping/step':>17} {'its share':>9}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.models.split(","):
            config = load_config(None, {"model.preset": preset})
            tokens = config.train.batch_size * config.model.block_size
            for depth in (0, 1, config.model.n_layer):
                t = measure(preset, depth, args.rounds, short, args.steps, Path(tmp))
                share = t["bookkeeping"] / (t["inside"] + t["bookkeeping"])
                rates = (
                    f"{tokens / t['plain']:>12,.0f} {tokens / t['trainer']:>14,.0f} {t['plain'] / t['trainer']:>6.3f}"
                )
                print(f"{preset:<12} {depth:>5} {rates} {t['bookkeeping'] * 1e3:>14.3f} ms {share:>9.2%}", flush=True)
            grown = growth_seconds(preset, config.model.n_layer, 40, Path(tmp))
            print(
                f"{preset:<12} growth 1 -> {config.model.n_layer}: {grown * 1e3:.1f} ms; one plain step at depth "
                f"{config.model.n_layer}: {t['plain'] * 1e3:.1f} ms ({grown / t['plain']:.2f} steps)",
                flush=True,
            )


if __name__ == "__main__":
    main()
