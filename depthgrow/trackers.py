"""Optional experiment trackers beside ``log.jsonl``: TensorBoard and Weights & Biases.

``log.jsonl`` stays the record of a run and is always written; a tracker gets a copy of every record
as scalars, so that a run can be watched in a familiar dashboard. Each is an optional dependency,
imported only when a run asks for it (``train.loggers``), so depthgrow imports without either.

Records map to scalars tagged ``EVENT/FIELD`` at the record's ``step``: ``train/loss``, ``train/lr``,
``train/depth``, ``train/flops``, ``train/tokens`` (``train/images``), ``train/wall_s``; ``eval/val_loss``,
``eval/val_accuracy`` and the counters; ``growth/from_depth``, ``growth/to_depth``, ``growth/seconds``,
``growth/val_loss_before``, ``growth/val_loss_after``. A nested table (a mixture of experts'
``expert_usage``) flattens to ``eval/expert_usage/layers.0.max_load``; strings (``phase``, ``init``) and
lists are left out, and a growth record also gets a one-line text note ``growth/summary``.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from depthgrow.errors import DepthgrowError

TENSORBOARD_DIR = "tensorboard"
# validation loss against compute: TensorBoard has one x-axis per scalar, so these live in a second
# event folder with the step counted in GFLOPs (a separate folder, because a resume purges by step and
# must not mix step numbers with GFLOP numbers)
TENSORBOARD_FLOPS_DIR = "vs_gflops"
FLOPS_PER_X = 1e9
FLOPS_TAGS = ("val_loss", "val_accuracy")
WANDB_ID_NAME = "wandb_id.txt"
WANDB_PROJECT = "depthgrow"
# tracker name -> (module that must import, extra of depthgrow that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a log record as ``EVENT/FIELD`` tags; empty for a record without a step."""
    if not isinstance(record.get("step"), int):
        return {}
    event = str(record.get("event", "record"))
    scalars: dict[str, float] = {}
    for key, value in record.items():
        if key not in ("event", "step"):
            _flatten(f"{event}/{key}", value, scalars)
    return scalars


def _flatten(tag: str, value: Any, into: dict[str, float]) -> None:
    # bool is an int in Python, but a flag plotted as 0/1 is noise rather than a metric
    if isinstance(value, int | float) and not isinstance(value, bool):
        into[tag] = float(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{tag}/{key}", item, into)


def record_notes(record: dict[str, Any]) -> dict[str, str]:
    """Text worth keeping beside the scalars: one line per expansion."""
    if record.get("event") != "growth" or not isinstance(record.get("step"), int):
        return {}
    text = f"depth {record.get('from_depth')} -> {record.get('to_depth')} at step {record['step']}"
    if "init" in record:
        text += f" (init {record['init']})"
    return {"growth/summary": text}


class _Backend(Protocol):
    def write(self, record: dict[str, Any], scalars: dict[str, float], notes: dict[str, str]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _import(name: str) -> Any:
    module, extra = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DepthgrowError(
            f"train.loggers includes {name} but the {module} package is not installed: pip install 'depthgrow[{extra}]'"
        ) from None


class _TensorBoard:
    """``SummaryWriter`` event files in ``out_dir/tensorboard`` (and ``tensorboard/vs_gflops``)."""

    def __init__(self, out_dir: Path, *, config: dict[str, Any], resume: bool, resume_step: int | None) -> None:
        _import("tensorboard")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's wrapper refuses a tensorboard older than it supports
            raise DepthgrowError(
                "train.loggers includes tensorboard but torch cannot use the installed tensorboard package: "
                "pip install -U 'depthgrow[tensorboard]'"
            ) from None
        self._writer_class = SummaryWriter
        self.directory = out_dir / TENSORBOARD_DIR
        if not resume:
            # a fresh start replaces the run, as log.jsonl is replaced: old event files would mix in
            for stale in self.directory.rglob("events.out.tfevents.*"):
                stale.unlink()
        # The checkpoint at step c was written after every record of step c, so a resumed run logs from
        # step c + 1 on (an expansion due at step c, which a killed run may have logged already, repeats
        # identical values at step c). purge_step makes TensorBoard drop what a killed run logged from
        # c + 1 on, so the resumed curve does not double back.
        purge = resume_step + 1 if resume and resume_step is not None else None
        self._writer = SummaryWriter(log_dir=str(self.directory), purge_step=purge)
        self._resume = resume
        self._flops_writer: Any = None  # opened at the first eval, when its x (GFLOPs) is known
        if not resume:
            # four-space indent: the text plugin renders Markdown, and this keeps the JSON a code block
            text = "\n".join("    " + line for line in json.dumps(config, indent=2, default=str).splitlines())
            self._writer.add_text("config", text, global_step=0)

    def write(self, record: dict[str, Any], scalars: dict[str, float], notes: dict[str, str]) -> None:
        step = record["step"]
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)
        for tag, text in notes.items():
            self._writer.add_text(tag, text, global_step=step)
        if record.get("event") == "eval" and isinstance(record.get("flops"), int | float):
            x = round(record["flops"] / FLOPS_PER_X)
            if self._flops_writer is None:
                # evaluations come at the same steps and FLOPs in a resumed run as in the killed one, so
                # purging from the first x it logs drops exactly what the resumed run logs again
                self._flops_writer = self._writer_class(
                    log_dir=str(self.directory / TENSORBOARD_FLOPS_DIR), purge_step=x if self._resume else None
                )
            for name in FLOPS_TAGS:
                if f"eval/{name}" in scalars:
                    self._flops_writer.add_scalar(f"eval_vs_gflops/{name}", scalars[f"eval/{name}"], global_step=x)

    def flush(self) -> None:
        self._writer.flush()
        if self._flops_writer is not None:
            self._flops_writer.flush()

    def close(self) -> None:
        self._writer.close()
        if self._flops_writer is not None:
            self._flops_writer.close()


class _Wandb:
    """A Weights & Biases run under ``out_dir/wandb``; offline unless ``WANDB_MODE`` says otherwise."""

    def __init__(self, out_dir: Path, *, run_name: str, config: dict[str, Any], resume: bool) -> None:
        wandb = _import("wandb")
        # the run id is kept in the run folder, so that a resumed training run continues the same W&B run
        id_path = out_dir / WANDB_ID_NAME
        if resume and id_path.exists():
            run_id = id_path.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids look
            id_path.write_text(run_id + "\n")
        # Offline by default: a training run must not upload anything, or stop to ask for a login, unless
        # the user says so (WANDB_MODE=online, after `wandb login`); offline runs upload later with
        # `wandb sync OUT_DIR/wandb/offline-run-*`.
        mode = os.environ.get("WANDB_MODE", "offline")
        try:
            self._run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
                name=run_name,
                id=run_id,
                resume="allow",
                dir=str(out_dir),
                config=config,
                mode=mode,
            )
        except wandb.errors.Error as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise DepthgrowError(
                f"wandb could not start a run ({first_line}); set WANDB_MODE=offline to log locally"
            ) from None
        # Plotted against the trainer's step, logged as a field, rather than wandb's own step: wandb drops
        # a row whose step is not above the last, which would lose the evaluations just before and after
        # an expansion (same step) and, after a resume, everything up to where a killed run got to.
        self._run.define_metric("step")
        for prefix in ("train", "eval", "growth"):
            self._run.define_metric(f"{prefix}/*", step_metric="step")

    def write(self, record: dict[str, Any], scalars: dict[str, float], notes: dict[str, str]) -> None:
        self._run.log({"step": record["step"], **scalars, **notes})

    def flush(self) -> None:
        pass  # wandb writes in its own process as it goes

    def close(self) -> None:
        self._run.finish()


class Trackers:
    """The trackers a run logs to besides ``log.jsonl``; with no names, a no-op."""

    def __init__(self, backends: list[_Backend] | None = None) -> None:
        self._backends = list(backends or [])

    @classmethod
    def open(
        cls,
        names: list[str],
        *,
        out_dir: Path,
        run_name: str,
        config: dict[str, Any],
        resume: bool,
        resume_step: int | None = None,
    ) -> Trackers:
        """Start the named trackers (``"tensorboard"``, ``"wandb"``) for the run in ``out_dir``.

        ``resume`` continues the trackers of the run there (the same W&B run id, appended event files);
        otherwise they start over. ``resume_step`` is the step of the checkpoint the run resumes from:
        TensorBoard then drops what a killed run logged after it. ``config`` is the run's config as a
        plain dict (``RunConfig.to_dict()``).
        """
        unknown = [name for name in names if name not in PACKAGES]
        if unknown:
            raise DepthgrowError(f"unknown train.loggers {', '.join(unknown)}; choose from: {', '.join(PACKAGES)}")
        out_dir = Path(out_dir)
        backends: list[_Backend] = []
        try:
            for name in dict.fromkeys(names):  # each once, in the order given
                if name == "tensorboard":
                    backends.append(_TensorBoard(out_dir, config=config, resume=resume, resume_step=resume_step))
                else:
                    backends.append(_Wandb(out_dir, run_name=run_name, config=config, resume=resume))
        except BaseException:
            for backend in backends:  # do not leave a started tracker behind when a later one fails
                backend.close()
            raise
        return cls(backends)

    def log(self, record: dict[str, Any]) -> None:
        """Send one log record (as written to ``log.jsonl``) to every tracker."""
        if not self._backends:
            return
        scalars, notes = record_scalars(record), record_notes(record)
        if not scalars and not notes:
            return
        for backend in self._backends:
            backend.write(record, scalars, notes)
        if record.get("event") in ("eval", "growth"):
            # as log.jsonl is flushed at each evaluation: they are rare, and what a dashboard is watched for
            self.flush()

    def flush(self) -> None:
        for backend in self._backends:
            backend.flush()

    def close(self) -> None:
        backends, self._backends = self._backends, []
        for backend in backends:
            backend.close()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
