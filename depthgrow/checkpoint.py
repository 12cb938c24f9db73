"""Checkpoints: one file per run, written atomically, holding everything a resume needs.

The file is written to a temporary name, synced, then renamed over the previous checkpoint, so a kill
at any moment leaves either the old or the new checkpoint whole. Model and optimizer state are keyed by
parameter name and unsharded, so they load into a model rebuilt at the
checkpoint's depth whatever the order in which its optimizer groups were built.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from depthgrow.distributed import full_model_state, load_optimizer_state_by_name, optimizer_state_by_name, plain_module
from depthgrow.errors import DepthgrowError
from depthgrow.optim import OptimizerChain

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 2  # 2: optimizer state keyed by parameter name, unsharded


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DepthgrowError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise DepthgrowError(f"checkpoint {path} is unreadable: {str(error).splitlines()[0]}") from None
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
