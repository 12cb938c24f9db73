"""Checkpoints: ``checkpoint.pt``, written atomically, holding everything a resume needs.

The file is written to a temporary name, synced, then renamed over the previous checkpoint, so a kill
at any moment leaves either the old or the new checkpoint whole. Model and optimizer state are keyed by
parameter name, so they load into a model rebuilt at the checkpoint's depth whatever the order in which
its optimizer groups were built.

A single process writes them into the file, unsharded. Several processes (DDP, FSDP2) write them with
``torch.distributed.checkpoint``: every rank its own shards, into ``checkpoint-shards/step-NNNNNNNN/``,
then rank 0 writes ``checkpoint.pt`` (everything else, and that folder's name) as above; the folder of the
previous checkpoint goes once the new one is named. A kill during the shards' write leaves the previous
``checkpoint.pt`` naming the previous, whole folder. The shards load at any world size, one process
included (see :class:`ShardedCheckpoints` and :func:`read_shards`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from depthgrow.distributed import load_optimizer_state_by_name, optimizer_state_by_name, plain_module
from depthgrow.errors import DepthgrowError, OutputWriteError, os_error_in
from depthgrow.optim import OptimizerChain

CHECKPOINT_NAME = "checkpoint.pt"
SHARDS_DIR = "checkpoint-shards"  # beside checkpoint.pt: one folder of shards per checkpoint of several processes
ZIP_MAGIC = b"PK\x03\x04"  # how every torch.save archive starts
FORMAT_VERSION = 2  # 2: optimizer state keyed by parameter name (in the file, or in the shards it names)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically; a write that fails (disk full, permissions, I/O) removes its
    temporary file, leaves the previous checkpoint as it was and raises :class:`OutputWriteError`."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with temporary.open("wb") as handle:
            torch.save({"format_version": FORMAT_VERSION, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _sync_folder(path.parent)
    except (OSError, RuntimeError) as error:
        cause = os_error_in(error)
        if cause is None:
            raise
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        note = "the previous checkpoint (if any) is left whole and the run stopped; free space and resume"
        raise OutputWriteError.of(path, cause, needed_bytes=_tensor_bytes(payload), note=note) from None


def _sync_folder(path: Path) -> None:
    """Make the entries of folder ``path`` durable (its files' contents are synced by whoever wrote them)."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _tensor_bytes(value: Any) -> int:
    """The bytes of the tensors in a nested payload: about the size of its file."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DepthgrowError(f"no checkpoint at {path}")
    expected = "expected the torch.save archive (a zip file) that depthgrow train writes"
    try:
        with path.open("rb") as handle:
            is_zip = handle.read(4) == ZIP_MAGIC
    except OSError as error:
        raise DepthgrowError(f"checkpoint {path} is unreadable: {error.strerror}") from None
    if not is_zip:
        raise DepthgrowError(f"checkpoint {path} is unreadable: it is not a zip archive; {expected}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's advice here (load with weights_only=False) must not be followed
        raise DepthgrowError(
            f"checkpoint {path} is unreadable: it holds Python objects other than tensors and plain values; {expected}"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        reason = str(error).splitlines()[0].split(". ")[0]
        raise DepthgrowError(f"checkpoint {path} is unreadable (damaged or cut short?): {reason}; {expected}") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise DepthgrowError(f"{path} is not a depthgrow checkpoint of format {FORMAT_VERSION}")
    return payload


def training_state(model: nn.Module, optimizer: OptimizerChain) -> dict[str, Any]:
    """Model and optimizer state of a single process (plain, compiled or DDP: unsharded), on the CPU and
    keyed by parameter name, so that it loads into a model of any parallel mode and world size
    (:func:`restore_training_state`). Parameters without optimizer state (none before the first step) are
    absent and start fresh on resume, as they would have. Several processes write shards instead."""
    weights = {name: value.cpu() for name, value in plain_module(model).state_dict().items()}
    states = {
        name: {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in state.items()}
        for name, state in optimizer_state_by_name(model, optimizer).items()
    }
    return {"model": weights, "optimizer": states}


def restore_training_state(model: nn.Module, optimizer: OptimizerChain, payload: dict[str, Any]) -> None:
    """Load :func:`training_state`'s output into a (possibly wrapped or sharded) model and its optimizer."""
    set_model_state_dict(plain_module(model), payload["model"], options=StateDictOptions(full_state_dict=True))
    load_optimizer_state_by_name(model, optimizer, payload["optimizer"])


READ_ATTEMPTS = 3  # reads of a run that keeps replacing its sharded checkpoint (see model_checkpoint)


def model_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` with its full (unsharded) model state under "model" and no optimizer
    state: what export and generate read. A run still training on several processes may name newer shards
    and remove the ones being read: the read then starts again from the newer checkpoint."""
    checkpoint, attempts = load_checkpoint(path), 1
    while True:
        checkpoint.pop("optimizer", None)  # often twice the model's size, and not needed
        try:
            return {**checkpoint, "model": _model_weights(checkpoint, path)}
        except DepthgrowError:
            newer = load_checkpoint(path)
            if attempts == READ_ATTEMPTS or newer.get("shards") == checkpoint.get("shards"):
                raise
            checkpoint, attempts = newer, attempts + 1


def _model_weights(checkpoint: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state of a checkpoint read from ``path``, whether it holds them or names
    shards beside it."""
    if "model" in checkpoint:
        return checkpoint["model"]
    folder = Path(path).parent / checkpoint["shards"]
    model = {name: _empty(meta) for name, meta in _stored(folder, "model").items()}
    read_shards(folder, {"model": model}, collective=False)
    return model


def optimizer_template(folder: Path, params: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Tensors to load the optimizer state of ``folder`` into, placed as each parameter in ``params`` (by
    name) is: a moment like its parameter (sharded under FSDP2), a step count as stored."""
    template: dict[str, dict[str, Any]] = {}
    for flat, meta in _stored(folder, "optimizer").items():
        name, _, key = flat.rpartition(".")  # state keys hold no dot, parameter names do
        if name not in params:
            raise DepthgrowError(
                f"checkpoint shards in {folder} belong to another model: they hold optimizer state of {name}, "
                "which this run's model has not"
            )
        like = params[name]
        if not isinstance(meta, TensorStorageMetadata):
            value: Any = None  # a plain value: stored as bytes, read as it was
        elif tuple(meta.size) == tuple(like.shape):
            value = torch.empty_like(like, dtype=meta.properties.dtype)
        else:
            value = _empty(meta)
        template.setdefault(name, {})[key] = value
    return template


def read_shards(folder: Path, state: dict[str, Any], *, collective: bool = True) -> None:
    """Fill the tensors of ``state`` (placed as this process holds them) from the shards in ``folder``,
    whatever world size wrote them: every rank of the process group together, or (``collective=False``)
    this process alone, as one that only reads a run does (export, generate)."""
    if not (folder / ".metadata").is_file():
        raise DepthgrowError(
            f"checkpoint shards {folder} are missing or half written (no .metadata): the checkpoint.pt that names "
            "them was not written by depthgrow after them, or the folder was changed since"
        )
    try:
        with warnings.catch_warnings():  # reading in one process is what is meant (export, a resume on one)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=folder, no_dist=not (collective and dist.is_initialized()))
    except (Exception, CheckpointException) as error:  # every rank's failure, wrapped (a BaseException)
        raise DepthgrowError(
            f"checkpoint shards in {folder} do not fit this run's model: {_first_line(error)}"
        ) from None


def _stored(folder: Path, section: str) -> dict[str, Any]:
    """The storage metadata of ``folder``'s entries under ``section`` ("model" or "optimizer"), by the
    name below it."""
    if not (folder / ".metadata").is_file():
        read_shards(folder, {})  # says why in one line
    try:
        metadata = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    except OSError as error:  # removed since (a run still training moved on) or unreadable
        raise DepthgrowError(f"checkpoint shards {folder} are unreadable: {error.strerror or error}") from None
    prefix = f"{section}."
    return {key[len(prefix) :]: meta for key, meta in metadata.items() if key.startswith(prefix)}


def _empty(meta: TensorStorageMetadata) -> torch.Tensor:
    return torch.empty(tuple(meta.size), dtype=meta.properties.dtype)


def _first_line(error: BaseException) -> str:
    """The first line of what went wrong, from the first failing rank of a checkpoint exception."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))[0]
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class ShardedCheckpoints:
    """The checkpoints of a run on several processes, each rank writing its own shards (see the module's
    docstring). With ``asynchronous`` the shards are written in a background thread (over a process group of
    their own) while training goes on; the checkpoint counts, and ``checkpoint.pt`` names it, once every
    rank has written: at the first :meth:`poll` that finds the write done, the next save or :meth:`wait`."""

    def __init__(self, out_dir: Path, *, is_main: bool, asynchronous: bool, committed: str | None = None) -> None:
        self.out_dir = out_dir
        self.is_main = is_main
        self.group = dist.new_group(backend="gloo") if asynchronous else None
        self.committed = committed  # the folder checkpoint.pt names, relative to out_dir
        self.pending: tuple[Future, str, dict[str, Any]] | None = None

    def save(self, step: int, tensors: dict[str, Any], rest: dict[str, Any]) -> None:
        """Write ``tensors`` (model and optimizer state as this rank holds them) as shards, then ``rest``
        (everything else, rank 0's) into ``checkpoint.pt``. Every rank calls this."""
        self.wait()
        folder = f"{SHARDS_DIR}/step-{step:08d}"
        if folder == self.committed:  # a second save of one step: never written over the folder in use
            folder += "-again"
        if self.is_main:  # what a save that never counted (killed, failed) left behind
            for stale in sorted((self.out_dir / SHARDS_DIR).glob("step-*")):
                if stale.relative_to(self.out_dir).as_posix() != self.committed:
                    shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()
        try:
            if self.group is None:
                dcp.save(tensors, checkpoint_id=self.out_dir / folder)
            else:
                self.pending = (
                    dcp.async_save(tensors, checkpoint_id=self.out_dir / folder, process_group=self.group),
                    folder,
                    rest,
                )
                return
        except (Exception, CheckpointException) as error:  # see read_shards
            raise self._write_error(folder, error) from None
        self._commit(folder, rest)

    def poll(self) -> None:
        """Name the checkpoint whose shards were being written, if they are written by now."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Wait for the shards being written, then name their checkpoint."""
        if self.pending is None:
            return
        future, folder, rest = self.pending
        self.pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as error:  # see read_shards
            raise self._write_error(folder, error) from None
        self._commit(folder, rest)

    def close(self) -> None:
        """Let the asynchronous writer's process group go (compare and experiment train many runs in one
        process group), unless a write still uses it (a run that failed: the previous checkpoint counts)."""
        if self.group is not None and self.pending is None:
            dist.destroy_process_group(self.group)
            self.group = None

    def _commit(self, folder: str, rest: dict[str, Any]) -> None:
        previous = self.committed
        if self.is_main:
            try:  # the folder and its entries must last as long as the checkpoint.pt that names it
                for path in (self.out_dir / folder, self.out_dir / SHARDS_DIR, self.out_dir):
                    _sync_folder(path)
            except OSError as error:
                raise self._write_error(folder, error) from None
            save_checkpoint(self.out_dir / CHECKPOINT_NAME, {**rest, "shards": folder})
        self.committed = folder  # only now: a failed write leaves the previous folder named, and kept
        if self.is_main and previous is not None:
            shutil.rmtree(self.out_dir / previous, ignore_errors=True)

    def _write_error(self, folder: str, error: BaseException) -> DepthgrowError:
        failures = getattr(error, "failures", None) or {}
        cause = next((os_error_in(f[0]) for f in failures.values() if os_error_in(f[0])), None) or os_error_in(error)
        note = "the previous checkpoint (if any) is left whole and the run stopped; free space and resume"
        if cause is not None:
            return OutputWriteError.of(self.out_dir / folder, cause, note=note)
        return OutputWriteError(
            f"cannot write the checkpoint shards {self.out_dir / folder}: {_first_line(error)}; {note}"
        )
