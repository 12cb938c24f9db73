"""Checkpoints: one file per run, written atomically, holding everything a resume needs.

The file is written to a temporary name, synced, then renamed over the previous checkpoint, so a kill
at any moment leaves either the old or the new checkpoint whole. Model and optimizer state are keyed by
parameter name and unsharded, so they load into a model rebuilt at the
checkpoint's depth whatever the order in which its optimizer groups were built.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from depthgrow.distributed import full_model_state, load_optimizer_state_by_name, optimizer_state_by_name, plain_module
from depthgrow.errors import DepthgrowError, OutputWriteError, os_error_in
from depthgrow.optim import OptimizerChain

CHECKPOINT_NAME = "checkpoint.pt"
ZIP_MAGIC = b"PK\x03\x04"  # how every torch.save archive starts
FORMAT_VERSION = 2  # 2: optimizer state keyed by parameter name, unsharded


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
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except (OSError, RuntimeError) as error:
        cause = os_error_in(error)
        if cause is None:
            raise
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        note = "the previous checkpoint (if any) is left whole and the run stopped; free space and resume"
        raise OutputWriteError.of(path, cause, needed_bytes=_tensor_bytes(payload), note=note) from None


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
    """Model and optimizer state, unsharded, on the CPU and keyed by parameter name: the same for a plain,
    a DDP, a compiled or an FSDP2-sharded model (every rank takes part in the gather), so a checkpoint
    written by N processes resumes on M. Parameters without optimizer state (none before the first
    step) are absent and start fresh on resume, as they would have."""
    weights = {name: value.cpu() for name, value in full_model_state(model).items()}
    states = {
        name: {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in state.items()}
        for name, state in optimizer_state_by_name(model, optimizer).items()
    }
    return {"model": weights, "optimizer": states}


def restore_training_state(model: nn.Module, optimizer: OptimizerChain, payload: dict[str, Any]) -> None:
    """Load :func:`training_state`'s output into a (possibly wrapped or sharded) model and its optimizer."""
    set_model_state_dict(plain_module(model), payload["model"], options=StateDictOptions(full_state_dict=True))
    load_optimizer_state_by_name(model, optimizer, payload["optimizer"])
