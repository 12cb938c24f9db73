"""The training loop: one run of a :class:`RunConfig`, growing at the planned steps, resumable anywhere.

A run directory holds ``config.toml`` (the resolved config), ``log.jsonl`` (a ``train`` record per
step, an ``eval`` record per evaluation, including just before and just after each expansion, and a
``growth`` record per expansion, followed by a ``memory`` record of its peak memory where the machine
measures it; a ``config_change`` record where a resume changed the learning rate or
another of ``RESUME_CHANGEABLE_KEYS``, a ``diverged`` record where the divergence guard stopped the run),
``checkpoint.pt`` (under several processes with the shards it names in ``checkpoint-shards/``, see
:mod:`depthgrow.checkpoint`) and, once finished, ``summary.json``. The folder is written only once data, model and
checkpoint have passed their checks; a failed write of any of these files stops the run with
:class:`OutputWriteError`, a diverged loss with :class:`Diverged`, before another checkpoint is written.

Everything random is a pure function of the seed and the step (batches, fresh blocks at growth), the
learning rate is a pure function of the step, and the checkpoint holds model, optimizer (by parameter
name), step, counters and the RNG state: a resumed run repeats the uninterrupted one's losses exactly,
before or after an expansion.

``train`` sets two pieces of global torch state: the seed of the default generator (dropout draws from
it) and, on the CPU, flush-to-zero for denormals (without it early steps ran many times slower).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from depthgrow.bpe import TOKENIZER_NAME
from depthgrow.checkpoint import (
    CHECKPOINT_NAME,
    SHARDS_DIR,
    ShardedCheckpoints,
    load_checkpoint,
    optimizer_template,
    read_shards,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from depthgrow.config import (
    RESUME_CHANGEABLE_KEYS,
    RESUME_FREE_KEYS,
    RunConfig,
    config_changes,
    config_differences,
    read_toml,
    save_config,
)
from depthgrow.data import Batches, make_batches
from depthgrow.distributed import (
    World,
    build_wrapped,
    grow_wrapped,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
    plain_module,
    world,
)
from depthgrow.errors import DepthgrowError, Diverged, OutputWriteError
from depthgrow.flops import DEPTHGROW, peak_tflops
from depthgrow.guard import DivergenceGuard
from depthgrow.masking import ResidualRamp, updated_ramp
from depthgrow.memory import peak_memory
from depthgrow.metrics import LOG_NAME, JsonlLog, Progress
from depthgrow.optim import OptimizerChain, build_optimizer
from depthgrow.schedule import GrowthPlan, extension_problem
from depthgrow.trackers import Trackers

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
    compile_time_s: float = 0.0  # the first step after each (re)compile: compilation plus one step
    last_val_loss: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    out_dir: Path
    state: TrainState
    final_val_loss: float | None  # None when the run stopped before its last step
    finished: bool
    is_main: bool = True  # rank 0 (the only one that reports) or a single process


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count()
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise DepthgrowError(f"train.device={name} but this machine has {count} CUDA device(s); use cpu or auto")
    return torch.device(name)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether train.precision means bf16 autocast on this device (auto: on CUDA only)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    world: World | None = None,
    autocast: AbstractContextManager | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy (of the next token, or of the class) over the fixed validation batches;
    across ranks each takes its rows of every batch (so that every rank runs every forward, as FSDP2
    needs) and the sums are added up."""
    model.eval()
    # summed on the device and read once: a read per batch would wait for the device every batch
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
    for x, y in batches:
        if world is not None:
            x, y = world.shard(x), world.shard(y)
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            logits = model(x)
        if y.numel():  # a rank's slice of a short last batch may be empty: it still ran the forward
            totals[0] += loss_fn(logits.float(), y) * y.numel()  # weighted: the last image batch may be smaller
        totals[1] += (logits.argmax(dim=-1) == y).sum()
        totals[2] += y.numel()
    model.train()
    loss_sum, correct, count = (totals if world is None else world.sum(totals)).tolist()
    return loss_sum / count, correct / count


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
    # a signal the command's own handler received but that was swallowed on the way (depthgrow.console)
    stop.requested = any(getattr(handler, "received", None) for handler in previous.values())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_out_dir(config: RunConfig, *, resume: bool, overwrite: bool) -> tuple[dict[str, Any] | None, dict]:
    """Check the output folder before any expensive work, writing nothing; return the checkpoint to resume
    from and the keys the resume changes (see ``RESUME_CHANGEABLE_KEYS``), each with its old and new value."""
    out_dir = Path(config.train.out_dir)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if resume:
        checkpoint = load_checkpoint(checkpoint_path)
        # read through RunConfig, so that keys added since the checkpoint was written take their defaults
        saved = RunConfig.from_dict(checkpoint["config"]).to_dict()
        changes = config_changes(saved, config.to_dict(), ignore=RESUME_FREE_KEYS)
        # a longer train.steps extends the run; growth.at and growth.ramp may then change to keep the expansions
        # made and a ramp under way as they were
        extending = {"train.steps", "growth.at", "growth.ramp"} if "train.steps" in changes else set()
        refused = [
            f"{key} ({old!r} in the checkpoint, {new!r} now)"
            for key, (old, new) in changes.items()
            if key not in RESUME_CHANGEABLE_KEYS | extending
        ]
        if refused:
            changeable = ", ".join(sorted(RESUME_CHANGEABLE_KEYS))
            raise DepthgrowError(
                f"checkpoint {checkpoint_path} belongs to another config; differing: {', '.join(refused)} "
                f"(a resume may change only {changeable}, a longer train.steps, and keys that change nothing trained)"
            )
        if extending:
            _check_extension(checkpoint, config)
        return checkpoint, changes
    if checkpoint_path.exists() and not overwrite:
        raise DepthgrowError(
            f"{out_dir} already holds a run; resume it with --resume, or pass --overwrite to start over"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise DepthgrowError(f"cannot write the run folder {out_dir}: it is a file")
    return None, {}


def _check_extension(checkpoint: dict[str, Any], config: RunConfig) -> None:
    before = RunConfig.from_dict(checkpoint["config"])
    state = checkpoint["train_state"]
    problem = extension_problem(
        config.schedule,
        before.plan(),
        config.plan(),
        step=state["step"],
        depth=state["depth"],
        old_total=before.train.steps,
        new_total=config.train.steps,
    )
    if problem is not None:
        raise DepthgrowError(
            f"cannot extend the run in {config.train.out_dir} from {before.train.steps} to {config.train.steps} "
            f"steps at step {state['step']}: {problem}"
        )


def _create_out_dir(config: RunConfig, *, fresh: bool) -> bool:
    """Write the run's config (a fresh run first clears what a previous run left); return whether the
    folder was created here, so that a run failing before its first step can take it away again."""
    out_dir = Path(config.train.out_dir)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            # a fresh start must not leave the old run's checkpoint behind for a later --resume to pick up
            for stale in (CHECKPOINT_NAME, CHECKPOINT_NAME + ".tmp", SUMMARY_NAME):
                (out_dir / stale).unlink(missing_ok=True)
            shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)
        else:  # a resume that changes the config (an extension): the summary is written again at the end
            (out_dir / SUMMARY_NAME).unlink(missing_ok=True)
        save_config(config, out_dir / CONFIG_NAME)
    except OSError as error:
        raise DepthgrowError(f"cannot write the run folder {out_dir}: {error.strerror}") from None
    return created


def _write_run_file(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as error:
        raise OutputWriteError.of(path, error, needed_bytes=len(text.encode()), note="the run stopped") from None


@dataclass(frozen=True)
class Display:
    """How a run shows itself: the label of its progress lines, and the command that resumes it after a
    Ctrl-C (None: ``depthgrow train --resume OUT_DIR``; compare and the experiments resume as a whole)."""

    label: str = "train"
    resume_hint: str | None = None


class Trainer:
    """One training run, built once from a config, the world of processes and, to resume, a checkpoint;
    :meth:`fit` trains it to the end (or to ``stop_at``).

    :meth:`state_dict` holds everything a resume needs and :meth:`load_state_dict` restores exactly that:
    model and optimizer state by parameter name (as this process holds them: DTensor shards under FSDP2),
    the counters (the step is also the data position: every batch is a function of the seed and the
    step), the RNG, the divergence guard and the log's length. ``model`` is what the step runs (wrapped
    for DDP, sharded for FSDP2, compiled if asked); :func:`plain_module` gives the model inside. :meth:`fit`
    ends the run: afterwards the outputs are closed and ``model`` is the plain module (its DDP wrapper let
    go while the process group still lives)."""

    def __init__(
        self,
        config: RunConfig,
        world: World,
        device: torch.device,
        *,
        checkpoint: dict[str, Any] | None = None,
        display: Display = Display(),
    ) -> None:
        self.config, self.world, self.device, self.display = config, world, device, display
        out_dir = Path(config.train.out_dir)
        run_bpe = out_dir / TOKENIZER_NAME
        self.batches: Batches | ImageBatches = make_batches(
            config.model,
            config.data,
            batch_size=config.train.batch_size,
            eval_batches=config.train.eval_batches,
            seed=config.train.seed,
            # a resumed run reads the vocabulary it started with, never a retrained or re-cached one
            bpe_file=run_bpe if checkpoint and run_bpe.is_file() else None,
        )
        self.val_batches = self.batches.val_batches()
        self.plan: GrowthPlan = config.plan()
        torch.manual_seed(config.train.seed)
        depth = checkpoint["train_state"]["depth"] if checkpoint else self.plan.initial_depth
        self.state = TrainState(depth=depth)
        self.model = build_wrapped(
            config.model.with_depth(depth),
            world,
            seed=config.train.seed,
            device=device,
            compile_model=config.train.compile,
        )
        self.optimizer: OptimizerChain = build_optimizer(plain_module(self.model), config.optim)
        self.guard = DivergenceGuard(config.train.diverge_factor)
        peak = peak_tflops(device, config.train.peak_tflops, config.train.precision)
        self.peak_flops = None if peak is None else peak * 1e12  # per second, per device, for MFU
        self.log: JsonlLog | None = None  # rank 0 only, opened by open_outputs
        self.trackers = Trackers()  # TensorBoard, W&B if asked (rank 0 only)
        self.log_offset: int | None = None  # where the log of the restored state ends
        self.compile_pending = config.train.compile  # the next step compiles: its time is compile time
        self.ramp: ResidualRamp | None = None  # msg's mask on the new blocks, while it ramps up
        self.shards = (
            ShardedCheckpoints(
                out_dir,
                is_main=world.is_main,
                asynchronous=config.train.async_checkpoint,
                committed=checkpoint.get("shards") if checkpoint else None,
            )
            if world.initialised
            else None
        )
        self.saved_step: int | None = None  # the step of the checkpoint in out_dir, if any
        self.fitted = False  # fit ends the run: it closes the outputs and unwraps the model
        if checkpoint is not None:
            self.load_state_dict(self._with_shards(checkpoint))
            self.saved_step = self.state.step
        self.model.train()

    # --- what a resume needs ---

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (the log flushed first, so that its length is the log's)."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":  # this rank's device only: a resume may see fewer GPUs per process
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": plain_module(self.model).state_dict(),
            "optimizer": optimizer_state_by_name(self.model, self.optimizer),
            "config": self.config.to_dict(),
            "train_state": self.state.state_dict(),
            "divergence_guard": self.guard.state_dict(),
            "tokenizer": getattr(self.batches.data, "tokenizer", None),  # what generate and export decode with
            "rng": rng,
            "log_offset": self.log.flush() if self.log is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; model and optimizer state may be full tensors (of a
        single-process checkpoint, loaded at any world size) or this process's shards."""
        self.state = TrainState(**state["train_state"])
        if self.state.depth != plain_module(self.model).config.n_layer:
            raise DepthgrowError(
                f"the state is of a depth-{self.state.depth} model, this trainer's is "
                f"{plain_module(self.model).config.n_layer} deep: build the trainer from the checkpoint"
            )
        if any(isinstance(value, DTensor) for value in state["model"].values()):
            plain_module(self.model).load_state_dict(state["model"])
            load_optimizer_state_by_name(self.model, self.optimizer, state["optimizer"])
        else:
            restore_training_state(plain_module(self.model), self.optimizer, state)
        self.guard.load_state_dict(state.get("divergence_guard", {}))
        torch.set_rng_state(state["rng"]["torch"])
        cuda_rng = state["rng"].get("cuda")
        if cuda_rng is not None and self.device.type == "cuda":
            if isinstance(cuda_rng, list | tuple):  # older checkpoints: every GPU's state, by device index
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                cuda_rng = cuda_rng[index] if index < len(cuda_rng) else None
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)
        self.log_offset = state["log_offset"]

    def _with_shards(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint with its model and optimizer state read from the shards it names (straight into
        this process's model and its shards of it), if it names any."""
        if "shards" not in checkpoint:
            return checkpoint
        folder = Path(self.config.train.out_dir) / checkpoint["shards"]
        plain = plain_module(self.model)
        tensors = {
            "model": plain.state_dict(),
            "optimizer": optimizer_template(folder, dict(plain.named_parameters())),
        }
        read_shards(folder, tensors)
        return {**checkpoint, **tensors}

    def save(self) -> None:
        """Write a checkpoint of the state now: one file from a single process, shards under several."""
        state = self.state_dict()
        self.saved_step = self.state.step  # on every rank: whether to save at the end is decided by all
        if self.world.is_main:
            self.trackers.flush()
        tensors = {key: state.pop(key) for key in ("model", "optimizer")}
        if self.shards is not None:
            self.shards.save(self.state.step, tensors, state)
        else:
            out_dir = Path(self.config.train.out_dir)
            payload = training_state(plain_module(self.model), self.optimizer)
            save_checkpoint(out_dir / CHECKPOINT_NAME, {**state, **payload})
            shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)  # of processes this run was resumed from

    # --- outputs ---

    def open_outputs(self, *, resumed: bool, changes: dict[str, Any]) -> None:
        """Write the run's folder (rank 0), now that data, model and checkpoint have passed: a run that fails
        before this leaves no folder behind (one it created itself) and an --overwrite leaves the old run
        whole; open the log and the trackers."""
        out_dir = Path(self.config.train.out_dir)
        created = False
        if self.world.is_main and (not resumed or changes):
            created = _create_out_dir(self.config, fresh=not resumed)
        self.world.barrier()  # rank 0 has cleared the folder of a previous run
        if not self.world.is_main:
            return
        run_bpe = out_dir / TOKENIZER_NAME
        try:
            if self.batches.bpe_json is not None and not (resumed and run_bpe.is_file()):
                _write_run_file(run_bpe, self.batches.bpe_json)
            self.log = JsonlLog(out_dir / LOG_NAME, truncate_to=self.log_offset if resumed else None)
            self.trackers = Trackers.open(
                self.config.train.loggers,
                out_dir=out_dir,
                run_name=out_dir.name,
                config=self.config.to_dict(),
                resume=resumed,
                resume_step=self.state.step if resumed else None,
            )
        except DepthgrowError:
            self.close_outputs()
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise

    def close_outputs(self) -> None:
        if self.log is not None:
            self.log.close()
        self.trackers.close()

    def write(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(record)
            self.trackers.log(record)

    # --- the loop ---

    def update_ramp(self) -> None:
        """Set the new blocks' mask for the coming forward passes (growth methods with a ramp)."""
        self.ramp = updated_ramp(self.ramp, plain_module(self.model), self.plan, self.state.step)

    @property
    def resume_command(self) -> str:
        launcher = f"torchrun --nproc_per_node {self.world.size} -m " if self.world.initialised else ""
        return self.display.resume_hint or f"{launcher}depthgrow train --resume {self.config.train.out_dir}"

    def autocast(self) -> AbstractContextManager:
        bf16 = uses_bf16(self.config.train.precision, self.device)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def train_step(self, stop: _StopRequest) -> tuple[float, bool]:
        """One optimizer step on this rank's share of the global batch; return the loss over the global
        batch and whether any rank was asked to stop (one all-reduce carries both)."""
        total = self.config.train.steps
        self.optimizer.set_lr_multiplier(self.plan.lr_multiplier(self.state.step, total, self.config.schedule))
        self.update_ramp()
        started = time.perf_counter()
        x, y = self.batches.train_batch(self.state.step)
        x, y = self.world.shard(x).to(self.device), self.world.shard(y).to(self.device)
        with self.autocast():
            loss = loss_fn(self.model(x), y)
        auxiliary = plain_module(self.model).auxiliary_loss()  # a router's balancing loss: trained, not logged
        (loss if auxiliary is None else loss + auxiliary).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        shared = torch.stack([loss.detach(), torch.tensor(float(stop.requested), device=self.device)])
        loss_sum, stops = self.world.sum(shared).tolist()
        loss_value = loss_sum / self.world.size
        seconds = time.perf_counter() - started
        if self.compile_pending:
            self.state.compile_time_s += seconds
            self.compile_pending = False
        else:
            self.state.train_time_s += seconds
        step_flops = DEPTHGROW.per_unit(plain_module(self.model).config) * self.batches.units_per_step
        self.state.step += 1
        self.state.units += self.batches.units_per_step
        self.state.flops += step_flops
        record = dict(event="train", step=self.state.step, loss=loss_value, lr=self.optimizer.param_groups[0]["lr"])
        if self.peak_flops is not None:
            record["mfu"] = step_flops / seconds / (self.peak_flops * self.world.size)
        self.write({**record, **self.counters()})
        self.check(self.guard.train(self.state.step, loss_value), "loss", loss_value)
        return loss_value, stops > 0

    def check(self, problem: str | None, quantity: str, value: float) -> None:
        """Stop the run if the divergence guard found a problem: before any checkpoint is written after it."""
        if problem is None:
            return
        self.write(dict(event="diverged", step=self.state.step, quantity=quantity, value=value))
        if self.log is not None:
            self.log.flush()
        if self.shards is not None:  # a checkpoint being written counts once written, before this step's
            self.shards.wait()
        lr = self.config.optim.lr
        if self.saved_step is None:
            advice = f"no checkpoint was written; start again with a lower optim.lr (now {lr:g})"
        else:
            advice = f"the checkpoint of step {self.saved_step} in {self.config.train.out_dir} is whole; " + (
                f"resume it with a lower learning rate: {self.resume_command} --optim.lr {lr / 2:g}"
                if self.display.resume_hint is None
                else f"lower optim.lr (now {lr:g}) and run {self.display.resume_hint} again"
            )
        factor = self.config.train.diverge_factor
        raise Diverged(f"training diverged: {problem} (train.diverge_factor={factor}); stopped, {advice}")

    def counters(self) -> dict[str, Any]:
        return {
            "depth": self.state.depth,
            "flops": self.state.flops,
            f"{self.batches.unit}s": self.state.units,
            "wall_s": self.state.train_time_s,
        }

    def evaluate(self, phase: str | None = None) -> float:
        self.update_ramp()
        val_loss, accuracy = evaluate(
            self.model, self.val_batches, self.device, world=self.world, autocast=self.autocast()
        )
        self.state.last_val_loss = val_loss
        record = dict(event="eval", step=self.state.step, val_loss=val_loss, val_accuracy=accuracy, **self.counters())
        if phase is not None:
            record["phase"] = phase
        record.update(plain_module(self.model).eval_metrics())  # an MoE's expert usage since the last eval
        self.write(record)
        if self.log is not None:
            self.log.flush()
        self.check(self.guard.validation(self.state.step, val_loss), "val_loss", val_loss)
        return val_loss

    def expand(self) -> tuple[float, float]:
        """Grow to the planned depth; the validation loss just before and just after."""
        before = self.evaluate("pre_growth")
        started = time.perf_counter()
        source_depth, target_depth = self.state.depth, self.plan.depth_at(self.state.step)
        growth = self.config.growth
        with peak_memory(self.device) as memory:
            self.model, self.optimizer = grow_wrapped(
                self.model,
                self.optimizer,
                self.world,
                target_depth,
                self.plan.init,
                seed=self.config.train.seed,
                copy_optimizer_state=growth.copy_optimizer_state,
                compile_model=self.config.train.compile,
            )
        self.compile_pending = self.config.train.compile
        seconds = time.perf_counter() - started
        self.state.growth_time_s += seconds
        self.state.depth = target_depth
        # the fullest rank's: how much memory growth took above what the rank held before it
        memory_bytes = self.world.max(torch.tensor([-1 if memory.bytes is None else memory.bytes], device=self.device))
        after = self.evaluate("post_growth")
        self.write(
            dict(
                event="growth",
                step=self.state.step,
                from_depth=source_depth,
                to_depth=target_depth,
                method=growth.method,
                init=self.plan.init,
                seconds=seconds,
                val_loss_before=before,
                val_loss_after=after,
            )
        )
        if memory_bytes.item() >= 0:  # a measurement, apart from what a resumed run repeats exactly
            self.write(dict(event="memory", step=self.state.step, phase="growth", peak_bytes=int(memory_bytes.item())))
        return before, after

    def fit(self, *, stop_at: int | None = None, changes: dict[str, Any] | None = None) -> RunResult:
        """Train to the last step (or to ``stop_at``, then save as a kill would), evaluating, growing and
        checkpointing as the config says; ``changes``: the config keys a resume changed (logged)."""
        if self.fitted:
            raise DepthgrowError("this Trainer has run already: fit ends a run; build another Trainer to train again")
        config, state, plan, ranks, label = self.config, self.state, self.plan, self.world, self.display.label
        total = config.train.steps
        out_dir = Path(config.train.out_dir)
        resumed = self.saved_step is not None
        quiet = None if ranks.is_main else open(os.devnull, "w")  # noqa: SIM115 - closed below
        progress = Progress(total=total, initial=state.step, label=label, **({"stream": quiet} if quiet else {}))
        if resumed:
            progress.write(
                f"{label}: resumed at step {state.step} (depth {state.depth}) from {out_dir / CHECKPOINT_NAME}"
            )
        else:
            for line in _header(config, plan, self.batches, self.device, ranks, label):
                progress.write(line)
        if changes:
            self.write(dict(event="config_change", step=state.step, changes={k: list(v) for k, v in changes.items()}))
            changed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
            progress.write(f"{label}: from step {state.step} on, {changed}")
        stopped = False
        with _stop_on_signals() as stop:
            try:
                if not resumed:  # the curve starts where training does
                    progress.write(f"{label} step 0/{total}: val_loss {self.evaluate():.4f}")
                while state.step < total and not stopped and (stop_at is None or state.step < stop_at):
                    if plan.depth_at(state.step) > state.depth:
                        before, after = self.expand()
                        progress.write(
                            f"{label}: grew to depth {state.depth} at step {state.step} "
                            f"(val_loss {before:.4f} before, {after:.4f} after)"
                        )
                    loss, stopped = self.train_step(stop)
                    # at an expansion step the pre-growth evaluation is the step's one
                    expanding_next = plan.depth_at(state.step) > state.depth
                    if (state.step % config.train.eval_every == 0 or state.step == total) and not expanding_next:
                        progress.write(f"{label} step {state.step}/{total}: val_loss {self.evaluate():.4f}")
                    if state.step % config.train.checkpoint_every == 0 or state.step == total:
                        self.save()
                    elif self.shards is not None:
                        self.shards.poll()
                    progress.update(state.step, self._progress_fields(loss))
                if self.saved_step != state.step:
                    self.save()
                if self.shards is not None:
                    self.shards.wait()
            finally:
                progress.close()
                self.close_outputs()
                if self.shards is not None:
                    self.shards.close()
                if quiet is not None:
                    quiet.close()
                # DDP's reducer holds the process group in C++: dropped after the group is destroyed, it
                # destroys gloo's backend holding the GIL, whose threads may still need it to free the last
                # collective's tensors - a deadlock at exit (about 1 run in 20 under load here)
                self.model = plain_module(self.model)
                self.fitted = True

        if state.step == total:
            counters = {
                key: value for key, value in state.state_dict().items() if key not in ("units", "last_val_loss")
            }
            summary = {
                "final_val_loss": state.last_val_loss,
                f"{self.batches.unit}s": state.units,
                **counters,
                "depths": list(plan.depths),
                "growth_steps": list(plan.steps),
            }
            if ranks.is_main:
                _write_run_file(out_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
            ranks.barrier()  # the summary is there for every rank (compare reads it on each)
            return RunResult(out_dir, state, state.last_val_loss, True, ranks.is_main)
        if stopped and ranks.is_main:
            print(
                f"{label}: interrupted at step {state.step}; checkpoint saved. Resume with: {self.resume_command}",
                file=sys.stderr,
            )
        return RunResult(out_dir, state, None, False, ranks.is_main)

    def _progress_fields(self, loss: float) -> dict[str, str]:
        state = self.state
        rate = state.units / max(state.train_time_s, 1e-9)
        fields = {"loss": f"{loss:.3f}", f"{self.batches.unit}/s": f"{rate:.0f}", "depth": str(state.depth)}
        if state.last_val_loss is not None:
            fields["val_loss"] = f"{state.last_val_loss:.3f}"
        if self.peak_flops is not None:
            mfu = state.flops / max(state.train_time_s, 1e-9) / (self.peak_flops * self.world.size)
            fields["mfu"] = f"{mfu:.1%}"
        return {**fields, "flops": f"{state.flops:.2e}"}


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
    that many steps with a checkpoint, as a kill would, so that it can be resumed; ``label`` and
    ``resume_hint`` are the run's :class:`Display`. Under torchrun with
    ``train.parallel`` ddp or fsdp every rank calls this; rank 0 alone writes the outputs."""
    config.validate()
    if config.train.compile and not torch._dynamo.is_dynamo_supported():
        raise DepthgrowError(
            f"train.compile=true, but torch {torch.__version__} cannot compile on Python {sys.version.split()[0]}; "
            "train without --train.compile"
        )
    with world(config.train.parallel, config.train.device, config.train.batch_size) as (ranks, device_name):
        checkpoint, changes = _check_out_dir(config, resume=resume, overwrite=overwrite)
        start_step = checkpoint["train_state"]["step"] if checkpoint else 0
        if stop_at is not None and not start_step < stop_at <= config.train.steps:
            raise DepthgrowError(f"--stop-at must be in ({start_step}, {config.train.steps}], got {stop_at}")
        device = resolve_device(device_name)
        if device.type == "cpu":
            torch.set_flush_denormal(True)
        display = Display(label, resume_hint)
        trainer = Trainer(config, ranks, device, checkpoint=checkpoint, display=display)
        trainer.open_outputs(resumed=checkpoint is not None, changes=changes)
        return trainer.fit(stop_at=stop_at, changes=changes)


def _header(
    config: RunConfig, plan: GrowthPlan, batches: Batches | ImageBatches, device: torch.device, ranks: World, label: str
) -> list[str]:
    """What a fresh run is about to do, as the lines printed before its first step."""
    name = f"{config.model_preset} ({config.model.family})" if config.model_preset else config.model.family
    counts = {d: config.model.with_depth(d).num_params() for d in plan.depths}
    params = ", ".join(f"{f'{n / 1e6:,.2f}M' if n >= 1e6 else f'{n:,}'} at depth {d}" for d, n in counts.items())
    if plan.steps:
        chain = " -> ".join(map(str, plan.depths))
        growth = f"grows {chain} layers at step {', '.join(map(str, plan.steps))} (init {plan.init}"
        if plan.ramp_steps:
            growth += f", new blocks ramped in over {plan.ramp_steps} steps"
        if plan.decay_from_growth:
            growth += ", the learning rate decaying from the last expansion"
        growth += f"; method {config.growth.method})"
    else:
        growth = f"fixed depth {plan.target_depth}"
    train = config.train
    where = f"{device.type}, {'bf16 autocast' if uses_bf16(train.precision, device) else 'fp32'}"
    if ranks.initialised:
        where += f", {ranks.size} processes ({train.parallel})"
    per_step = f"{batches.units_per_step:,} {batches.unit}s"
    if batches.unit == "token":
        per_step += f" ({train.batch_size} x {config.model.block_size})"
    optim = config.optim
    return [
        f"{label}: {name}, {growth}; parameters {params}",
        f"{label}: data {batches.describe()}",
        f"{label}: T = {train.steps} steps of {per_step}; {optim.name} lr {optim.lr:g}, {config.schedule.name} "
        f"schedule; {where}; seed {train.seed}",
        f"{label}: outputs in {train.out_dir}",
    ]


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
