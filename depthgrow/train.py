"""The training loop: one run of a :class:`RunConfig`, growing at the planned steps, resumable anywhere.

A run directory holds ``config.toml`` (the resolved config), ``log.jsonl`` (a ``train`` record per
step, an ``eval`` record per evaluation, including just before and just after each expansion, and a
``growth`` record per expansion), ``checkpoint.pt`` and, once finished, ``summary.json``.

Everything random is a pure function of the seed and the step (batches, fresh blocks at growth), the
learning rate is a pure function of the step, and the checkpoint holds model, optimizer (by parameter
name), step, counters and the RNG state: a resumed run repeats the uninterrupted one's losses exactly,
before or after an expansion.

``train`` sets two pieces of global torch state: the seed of the default generator (dropout draws from
it) and, on the CPU, flush-to-zero for denormals (without it early steps ran many times slower).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from depthgrow.config import RESUME_FREE_KEYS, RunConfig, config_differences, read_toml, save_config
from depthgrow.data import Batches, make_batches
from depthgrow.errors import DepthgrowError
from depthgrow.flops import DEPTHGROW
from depthgrow.growth import grow
from depthgrow.metrics import LOG_NAME, JsonlLog, Progress
from depthgrow.models import build_model
from depthgrow.optim import OptimizerChain, build_optimizer
from depthgrow.schedule import GrowthPlan, lr_multiplier

if TYPE_CHECKING:
    from depthgrow.vision import ImageBatches

CONFIG_NAME = "config.toml"
SUMMARY_NAME = "summary.json"


@dataclass
class TrainState:
    """Counters that make a run resumable; ``step`` counts completed optimizer steps."""

    depth: int
    step: int = 0
    units: int = 0  # tokens (images for an image model) trained on
    flops: float = 0.0  # cumulative training FLOPs across depth changes (depthgrow counting)
    train_time_s: float = 0.0  # time in training steps only: no evaluation, checkpoint or growth
    growth_time_s: float = 0.0
    last_val_loss: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    out_dir: Path
    state: TrainState
    final_val_loss: float | None  # None when the run stopped before its last step
    finished: bool


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count()
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise DepthgrowError(f"train.device={name} but this machine has {count} CUDA device(s); use cpu or auto")
    return torch.device(name)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[float, float]:
    """Mean loss and accuracy (of the next token, or of the class) over the fixed validation batches."""
    model.eval()
    # summed on the device and read once: a read per batch would wait for the device every batch
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for x, y in batches:
        logits = model(x.to(device))
        y = y.to(device)
        loss += loss_fn(logits, y) * y.numel()  # weighted: the last image batch may be smaller
        correct += (logits.argmax(dim=-1) == y).sum()
        count += y.numel()
    model.train()
    return loss.item() / count, correct.item() / count


class _StopRequest:
    """Ctrl-C (or SIGTERM, as batch schedulers and torchrun send) sets a flag that the loop reads between
    steps, so the checkpoint written on the way out is of a whole step; a second Ctrl-C interrupts at
    once (the previous checkpoint stays whole)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    stop = _StopRequest()
    try:
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave the signals as they are
        yield stop
        return
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _prepare_out_dir(config: RunConfig, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check the output folder before any expensive work; return the checkpoint to resume from."""
    out_dir = Path(config.train.out_dir)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if resume:
        checkpoint = load_checkpoint(checkpoint_path)
        differing = config_differences(config.to_dict(), checkpoint["config"], ignore=RESUME_FREE_KEYS)
        if differing:
            raise DepthgrowError(
                f"checkpoint {checkpoint_path} belongs to another config; differing: {', '.join(differing)}"
            )
        return checkpoint
    if checkpoint_path.exists() and not overwrite:
        raise DepthgrowError(
            f"{out_dir} already holds a run; resume it with --resume, or pass --overwrite to start over"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # a fresh start must not leave the old run's checkpoint behind for a later --resume to pick up
        for stale in (CHECKPOINT_NAME, CHECKPOINT_NAME + ".tmp", SUMMARY_NAME):
            (out_dir / stale).unlink(missing_ok=True)
        save_config(config, out_dir / CONFIG_NAME)
    except OSError as error:
        raise DepthgrowError(f"cannot write the run folder {out_dir}: {error.strerror}") from None
    return None


@dataclass
class _Run:
    """What one training run holds while it runs."""

    config: RunConfig
    plan: GrowthPlan
    batches: Batches | ImageBatches
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    device: torch.device
    model: nn.Module
    optimizer: OptimizerChain
    state: TrainState
    log: JsonlLog

    def train_step(self) -> float:
        total = self.config.train.steps
        self.optimizer.set_lr_multiplier(lr_multiplier(self.state.step, total, self.config.schedule))
        started = time.perf_counter()
        x, y = self.batches.train_batch(self.state.step)
        loss = loss_fn(self.model(x.to(self.device)), y.to(self.device))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise DepthgrowError(
                f"the training loss became {loss_value} at step {self.state.step + 1}; the last checkpoint "
                "(if any) is left as it was; lower optim.lr or check the data"
            )
        self.state.train_time_s += time.perf_counter() - started
        self.state.step += 1
        self.state.units += self.batches.units_per_step
        self.state.flops += DEPTHGROW.per_unit(self.model.config) * self.batches.units_per_step
        record = dict(event="train", step=self.state.step, loss=loss_value, lr=self.optimizer.param_groups[0]["lr"])
        self.log.write({**record, **self.counters()})
        return loss_value

    def counters(self) -> dict[str, Any]:
        return {
            "depth": self.state.depth,
            "flops": self.state.flops,
            f"{self.batches.unit}s": self.state.units,
            "wall_s": self.state.train_time_s,
        }

    def evaluate(self, phase: str | None = None) -> float:
        val_loss, accuracy = evaluate(self.model, self.val_batches, self.device)
        self.state.last_val_loss = val_loss
        record = dict(event="eval", step=self.state.step, val_loss=val_loss, val_accuracy=accuracy, **self.counters())
        if phase is not None:
            record["phase"] = phase
        if hasattr(self.model, "expert_usage"):  # mixtures of experts: load per block since the last eval
            record["expert_usage"] = self.model.expert_usage()
            self.model.reset_expert_usage()
        self.log.write(record)
        self.log.flush()
        return val_loss

    def expand(self) -> None:
        before = self.evaluate("pre_growth")
        started = time.perf_counter()
        source_depth, target_depth = self.state.depth, self.plan.depth_at(self.state.step)
        growth = self.config.growth
        self.model, self.optimizer, _ = grow(
            self.model,
            self.optimizer,
            target_depth,
            growth.init,
            seed=self.config.train.seed,
            copy_optimizer_state=growth.copy_optimizer_state,
        )
        seconds = time.perf_counter() - started
        self.state.growth_time_s += seconds
        self.state.depth = target_depth
        after = self.evaluate("post_growth")
        self.log.write(
            dict(
                event="growth",
                step=self.state.step,
                from_depth=source_depth,
                to_depth=target_depth,
                init=growth.init,
                seconds=seconds,
                val_loss_before=before,
                val_loss_after=after,
            )
        )

    def save(self) -> None:
        payload = training_state(self.model, self.optimizer)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        payload.update(
            config=self.config.to_dict(), train_state=self.state.state_dict(), rng=rng, log_offset=self.log.flush()
        )
        save_checkpoint(Path(self.config.train.out_dir) / CHECKPOINT_NAME, payload)


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_at: int | None = None,
    label: str = "train",
    resume_hint: str | None = None,
) -> RunResult:
    """Run (or, with ``resume``, continue) training as ``config`` says; ``stop_at`` ends the run after
    that many steps with a checkpoint, as a kill would, so that it can be resumed. ``resume_hint`` is the
    command printed after a Ctrl-C (default: ``depthgrow train --resume OUT_DIR``)."""
    config.validate()
    checkpoint = _prepare_out_dir(config, resume=resume, overwrite=overwrite)
    start_step = checkpoint["train_state"]["step"] if checkpoint else 0
    if stop_at is not None and not start_step < stop_at <= config.train.steps:
        raise DepthgrowError(f"--stop-at must be in ({start_step}, {config.train.steps}], got {stop_at}")
    out_dir = Path(config.train.out_dir)

    device = resolve_device(config.train.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    batches = make_batches(
        config.model,
        config.data,
        batch_size=config.train.batch_size,
        eval_batches=config.train.eval_batches,
        seed=config.train.seed,
    )
    plan = config.plan()
    torch.manual_seed(config.train.seed)
    state = TrainState(**checkpoint["train_state"]) if checkpoint else TrainState(depth=plan.initial_depth)
    model = build_model(config.model.with_depth(state.depth), seed=config.train.seed, device=device)
    optimizer = build_optimizer(model, config.optim)
    if checkpoint:
        restore_training_state(model, optimizer, checkpoint)
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if "cuda" in checkpoint["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    log = JsonlLog(out_dir / LOG_NAME, truncate_to=checkpoint["log_offset"] if checkpoint else None)
    run = _Run(config, plan, batches, batches.val_batches(), device, model, optimizer, state, log)
    model.train()

    total = config.train.steps
    progress = Progress(total=total, initial=state.step, label=label)
    if checkpoint:
        progress.write(f"{label}: resumed at step {state.step} (depth {state.depth}) from {out_dir / CHECKPOINT_NAME}")
    saved_at = state.step if checkpoint else -1
    with _stop_on_signals() as stop:
        try:
            while state.step < total and not stop.requested and (stop_at is None or state.step < stop_at):
                if plan.depth_at(state.step) > state.depth:
                    run.expand()
                    progress.write(f"{label}: grew to depth {state.depth} at step {state.step}")
                loss = run.train_step()
                if state.step % config.train.eval_every == 0 or state.step == total:
                    run.evaluate()
                if state.step % config.train.checkpoint_every == 0 or state.step == total:
                    run.save()
                    saved_at = state.step
                rate = state.units / max(state.train_time_s, 1e-9)
                fields = {"loss": f"{loss:.3f}", f"{batches.unit}/s": f"{rate:.0f}", "depth": str(state.depth)}
                progress.update(state.step, {**fields, "flops": f"{state.flops:.2e}"})
            if saved_at != state.step:
                run.save()
        finally:
            progress.close()
            log.close()

    if state.step == total:
        summary = {
            "final_val_loss": state.last_val_loss,
            f"{batches.unit}s": state.units,
            **state.state_dict(),
            "depths": list(plan.depths),
            "growth_steps": list(plan.steps),
        }
        (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        return RunResult(out_dir, state, state.last_val_loss, True)
    if stop.requested:
        hint = resume_hint or f"depthgrow train --resume {out_dir}"
        print(f"{label}: interrupted at step {state.step}; checkpoint saved. Resume with: {hint}", file=sys.stderr)
    return RunResult(out_dir, state, None, False)


def run_or_reuse(
    config: RunConfig, *, label: str, overwrite: bool = False, resume_hint: str | None = None
) -> dict[str, Any] | None:
    """The summary of ``config``'s run in its ``out_dir``: reused when a finished run of the same config is
    there, resumed when a started one is, trained otherwise. A run of another config is replaced only
    with ``overwrite``. None when stopped by Ctrl-C."""
    out_dir = Path(config.train.out_dir)
    saved_config = out_dir / CONFIG_NAME
    same = saved_config.exists() and not config_differences(
        config.to_dict(), RunConfig.from_dict(read_toml(saved_config)).to_dict(), ignore=RESUME_FREE_KEYS
    )
    started = (out_dir / CHECKPOINT_NAME).exists()
    if same and (out_dir / SUMMARY_NAME).exists():
        print(f"{label}: reusing the finished run in {out_dir}")
        return json.loads((out_dir / SUMMARY_NAME).read_text())
    if started and not same and not overwrite:
        raise DepthgrowError(f"{out_dir} holds a run of another config; pass --overwrite to replace it")
    result = train(config, resume=same and started, overwrite=True, label=label, resume_hint=resume_hint)
    return json.loads((out_dir / SUMMARY_NAME).read_text()) if result.finished else None
