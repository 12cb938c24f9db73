"""The training loop: one run of a :class:`RunConfig`, growing at the planned steps, resumable anywhere.

A run directory holds ``config.toml`` (the resolved config), ``log.jsonl`` (a ``train`` record per
step, an ``eval`` record per evaluation, including just before and just after each expansion, and a
``growth`` record per expansion), ``checkpoint.pt`` and, once finished, ``summary.json``.

Everything random is a pure function of the seed and the step (batches, fresh blocks at growth), the
learning rate is a pure function of the step, and the checkpoint holds model, optimizer (by parameter
name), step, counters and the torch RNG state: a resumed run repeats the uninterrupted one's losses
exactly, before or after an expansion.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from depthgrow.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from depthgrow.config import RESUME_FREE_KEYS, RunConfig, config_differences, save_config
from depthgrow.data import Batches, load_data
from depthgrow.errors import DepthgrowError
from depthgrow.flops import DEPTHGROW
from depthgrow.growth import grow
from depthgrow.metrics import LOG_NAME, JsonlLog, Progress, read_log
from depthgrow.models import build_model
from depthgrow.optim import OptimizerChain, build_optimizer
from depthgrow.schedule import GrowthPlan, growth_plan, lr_multiplier

CONFIG_NAME = "config.toml"
SUMMARY_NAME = "summary.json"


@dataclass
class TrainState:
    """Counters that make a run resumable; ``step`` counts completed optimizer steps."""

    depth: int
    step: int = 0
    tokens: int = 0
    flops: float = 0.0  # cumulative training FLOPs across depth changes (depthgrow counting)
    train_time_s: float = 0.0  # time in training steps only: no evaluation, checkpoint or growth
    growth_time_s: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    out_dir: Path
    state: TrainState
    final_val_loss: float | None  # None when the run stopped before its last step
    finished: bool


def plan_of(config: RunConfig) -> GrowthPlan:
    return growth_plan(
        source_depth=config.growth.source_depth,
        via=config.growth.via,
        at=config.growth.at,
        target_depth=config.model.n_layer,
        total_steps=config.train.steps,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DepthgrowError(f"train.device={name} but this machine has no CUDA device; use cpu or auto")
    return torch.device(name)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    model.eval()
    total = sum(loss_fn(model(x.to(device)), y.to(device)).item() for x, y in batches)
    model.train()
    return total / len(batches)


def check_resumable(config: RunConfig, checkpoint: dict[str, Any], path: Path) -> None:
    differing = config_differences(config.to_dict(), checkpoint["config"], ignore=RESUME_FREE_KEYS)
    if differing:
        raise DepthgrowError(f"checkpoint {path} belongs to another config; differing: {', '.join(differing)}")


class _StopRequest:
    """Ctrl-C sets a flag that the loop reads between steps, so the checkpoint written on the way out
    is of a whole step; a second Ctrl-C interrupts at once (the previous checkpoint stays whole)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def _stop_on_ctrl_c() -> Iterator[_StopRequest]:
    stop = _StopRequest()
    try:
        previous = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread: leave Ctrl-C as it is
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_at: int | None = None,
    label: str = "train",
) -> RunResult:
    """Run (or, with ``resume``, continue) training as ``config`` says; ``stop_at`` ends the run after
    that many steps with a checkpoint, as a kill would, so that it can be resumed."""
    config.validate()
    out_dir = Path(config.train.out_dir)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if not resume and checkpoint_path.exists() and not overwrite:
        raise DepthgrowError(
            f"{out_dir} already holds a run; resume it with --resume, or pass --overwrite to start over"
        )
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(checkpoint_path)
        check_resumable(config, checkpoint, checkpoint_path)

    device = resolve_device(config.train.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals made early steps many times slower on CPU
    data = load_data(config.data)
    if data.vocab_size > config.model.vocab_size:
        raise DepthgrowError(
            f"the {config.data.tokenizer} tokenizer has {data.vocab_size} tokens but model.vocab_size is "
            f"{config.model.vocab_size}; raise model.vocab_size or pick a preset for this vocabulary"
        )
    batches = Batches(
        data,
        block_size=config.model.block_size,
        batch_size=config.train.batch_size,
        eval_batches=config.train.eval_batches,
        seed=config.train.seed,
    )
    val_batches = batches.val_batches()
    plan = plan_of(config)
    total = config.train.steps
    tokens_per_step = config.train.batch_size * config.model.block_size

    torch.manual_seed(config.train.seed)
    state = TrainState(depth=plan.initial_depth)
    if checkpoint is not None:
        state = TrainState(**checkpoint["train_state"])
    model = build_model(config.model.with_depth(state.depth), seed=config.train.seed, device=device)
    optimizer = build_optimizer(model, config.optim)
    if checkpoint is not None:
        restore_training_state(model, optimizer, checkpoint)
        torch.set_rng_state(checkpoint["rng"]["torch"])
        log = JsonlLog(out_dir / LOG_NAME, truncate_to=checkpoint["log_offset"])
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / CONFIG_NAME)
        (out_dir / SUMMARY_NAME).unlink(missing_ok=True)
        log = JsonlLog(out_dir / LOG_NAME)
    model.train()

    def save() -> None:
        payload = training_state(model, optimizer)
        payload.update(
            config=config.to_dict(),
            train_state=state.state_dict(),
            rng={"torch": torch.get_rng_state()},
            data={"seed": batches.seed, "next_step": state.step},
            log_offset=log.flush(),
        )
        save_checkpoint(checkpoint_path, payload)

    def log_eval(phase: str | None = None) -> float:
        val_loss = evaluate(model, val_batches, device)
        record = dict(
            event="eval",
            step=state.step,
            val_loss=val_loss,
            depth=state.depth,
            flops=state.flops,
            tokens=state.tokens,
            wall_s=state.train_time_s,
        )
        log.write(record if phase is None else {**record, "phase": phase})
        return val_loss

    progress = Progress(total=total, initial=state.step, label=label)
    if checkpoint is not None:
        progress.write(f"{label}: resumed at step {state.step} (depth {state.depth}) from {checkpoint_path}")
    saved_at = state.step if checkpoint is not None else -1
    val_loss = None
    with _stop_on_ctrl_c() as stop:
        try:
            while state.step < total and not stop.requested and (stop_at is None or state.step < stop_at):
                if plan.depth_at(state.step) > state.depth:
                    model, optimizer = _expand(model, optimizer, plan, state, config, log_eval, log)
                    progress.write(f"{label}: grew to depth {state.depth} at step {state.step}")
                optimizer.set_lr_multiplier(lr_multiplier(state.step, total, config.schedule))
                started = time.perf_counter()
                x, y = batches.train_batch(state.step)
                loss = loss_fn(model(x.to(device)), y.to(device))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_value = loss.item()
                state.train_time_s += time.perf_counter() - started
                state.step += 1
                state.tokens += tokens_per_step
                state.flops += DEPTHGROW.per_token(model.config) * tokens_per_step
                lr = optimizer.param_groups[0]["lr"]
                log.write(
                    dict(
                        event="train",
                        step=state.step,
                        loss=loss_value,
                        lr=lr,
                        depth=state.depth,
                        flops=state.flops,
                        tokens=state.tokens,
                        wall_s=state.train_time_s,
                    )
                )
                if state.step % config.train.eval_every == 0 or state.step == total:
                    val_loss = log_eval()
                if state.step % config.train.checkpoint_every == 0 or state.step == total:
                    save()
                    saved_at = state.step
                progress.update(
                    state.step,
                    {
                        "loss": f"{loss_value:.3f}",
                        "tok/s": f"{state.tokens / max(state.train_time_s, 1e-9):.0f}",
                        "depth": str(state.depth),
                        "flops": f"{state.flops:.2e}",
                    },
                )
            if saved_at != state.step:
                save()
        finally:
            progress.close()
            log.close()

    finished = state.step == total
    if finished:
        summary = {
            "final_val_loss": val_loss if val_loss is not None else _last_val_loss(out_dir / LOG_NAME),
            **state.state_dict(),
            "depths": list(plan.depths),
            "growth_steps": list(plan.steps),
        }
        (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        return RunResult(out_dir, state, summary["final_val_loss"], True)
    if stop.requested:
        print(
            f"{label}: interrupted at step {state.step}; checkpoint saved. "
            f"Resume with: depthgrow train --resume {out_dir}",
            file=sys.stderr,
        )
    return RunResult(out_dir, state, None, False)


def _expand(
    model: nn.Module,
    optimizer: OptimizerChain,
    plan: GrowthPlan,
    state: TrainState,
    config: RunConfig,
    log_eval: Any,
    log: JsonlLog,
) -> tuple[nn.Module, OptimizerChain]:
    before = log_eval("pre_growth")
    started = time.perf_counter()
    source_depth, target_depth = state.depth, plan.depth_at(state.step)
    model, optimizer, _ = grow(
        model,
        optimizer,
        target_depth,
        config.growth.init,
        seed=config.train.seed,
        copy_optimizer_state=config.growth.copy_optimizer_state,
    )
    seconds = time.perf_counter() - started
    state.growth_time_s += seconds
    state.depth = target_depth
    after = log_eval("post_growth")
    log.write(
        dict(
            event="growth",
            step=state.step,
            from_depth=source_depth,
            to_depth=target_depth,
            init=config.growth.init,
            seconds=seconds,
            val_loss_before=before,
            val_loss_after=after,
        )
    )
    return model, optimizer


def _last_val_loss(log_path: Path) -> float | None:
    evals = [r for r in read_log(log_path) if r["event"] == "eval"]
    return evals[-1]["val_loss"] if evals else None
