"""Checkpoints: one file per run, written atomically, holding everything a resume needs.

The file is written to a temporary name, synced, then renamed over the previous checkpoint, so a kill
at any moment leaves either the old or the new checkpoint whole. Model and optimizer state are keyed by
parameter name (``torch.distributed.checkpoint.state_dict``), so they load into a model rebuilt at the
checkpoint's depth whatever the order in which its optimizer groups were built.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from depthgrow.errors import DepthgrowError
from depthgrow.optim import OptimizerChain

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


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
    # before the first step there is no optimizer state to save; asking DCP for it anyway would make it
    # initialise the state with a zero-gradient step, which counts as a step for AdamW
    has_state = all(opt.state for opt in optimizer.optimizers)
    optimizer_state = get_optimizer_state_dict(model, optimizer.optimizers) if has_state else None
    return {"model": model.state_dict(), "optimizer": optimizer_state}


def restore_training_state(model: nn.Module, optimizer: OptimizerChain, payload: dict[str, Any]) -> None:
    model.load_state_dict(payload["model"])
    if payload["optimizer"] is not None:
        # not strict: parameters that never had a gradient have no state to load
        options = StateDictOptions(strict=False)
        set_optimizer_state_dict(model, optimizer.optimizers, payload["optimizer"], options=options)
