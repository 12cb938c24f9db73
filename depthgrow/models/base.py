"""What every model family supplies, so that growth, FLOP accounting and the trainer never special-case one.

A family is a config dataclass (subclass of :class:`ModelConfig`) and an ``nn.Module`` built from it that
follows :class:`GrowableModel`. Growth only needs the block stacks (found by their parameter-name prefix),
a way to make and initialise one block as a fresh model of the current depth would, and the modules
whose outputs are added to the residual stream (zeroed by the function-preserving inits).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """Fields shared by every family. ``n_layer`` is the depth that growth changes: the number of blocks
    in each block stack."""

    family: ClassVar[str]
    n_layer: int

    def with_depth(self, depth: int) -> ModelConfig:
        return dataclasses.replace(self, n_layer=depth)

    def num_params(self, *, embeddings: bool = True) -> int:
        raise NotImplementedError

    def flops_per_token(self, *, count_embeddings: bool = False, count_attention: bool = True) -> float:
        raise NotImplementedError

    def problems(self) -> list[str]:
        """Everything wrong with this config, as short sentences (empty when it is valid)."""
        return [] if self.n_layer >= 0 else [f"model.n_layer must be >= 0, got {self.n_layer}"]


@runtime_checkable
class GrowableModel(Protocol):
    config: ModelConfig

    def block_stacks(self) -> dict[str, nn.ModuleList]:
        """The stacks whose length is the depth, keyed by their parameter-name prefix."""
        ...

    def make_block(self, stack: str) -> nn.Module:
        """A new, uninitialised block for ``stack``, on the model's device and dtype."""
        ...

    def init_block(self, stack: str, index: int, block: nn.Module, seed: int) -> None:
        """Initialise ``block`` as slot ``index`` of ``stack`` in a fresh model of depth ``config.n_layer``
        would be, drawing from a generator derived from (seed, stack, index) only."""
        ...

    def residual_projections(self, block: nn.Module) -> list[nn.Module]:
        """The modules whose outputs the block adds to the residual stream."""
        ...

    def init_weights(self, seed: int) -> None:
        """Set every parameter and buffer: the model is built on the meta device and allocated with
        ``to_empty``, so nothing holds a meaningful value before this."""
        ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...
