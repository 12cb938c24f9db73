"""MSG's mask: the new blocks' residual outputs scaled by one factor that a plan ramps from 0 to 1.

At 0 the grown model computes exactly what the model before the expansion did (each new block adds
nothing to the residual stream); the factor then rises linearly over the plan's ``ramp_steps`` and the
hooks come off at 1. The factor is a function of the step (:meth:`GrowthPlan.ramp_at`), so a resumed run
puts the same hooks back with the same value and nothing about the mask needs to be checkpointed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from depthgrow.growth import new_slots, slot_sources
from depthgrow.schedule import GrowthPlan


class ResidualRamp:
    """Forward hooks that multiply the outputs of ``blocks``' residual projections by :attr:`scale`."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], expansion: int) -> None:
        self.expansion = expansion  # the plan's expansion whose new blocks these are
        # a tensor, not a float: a compiled model reads its value instead of recompiling for each one
        self.scale = torch.zeros((), device=next(model.parameters()).device)
        self.handles: list[RemovableHandle] = [
            projection.register_forward_hook(self._scaled)
            for block in blocks
            for projection in model.residual_projections(block)
        ]

    def _scaled(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * self.scale

    def set(self, value: float) -> None:
        self.scale.fill_(value)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def new_blocks(model: nn.Module, plan: GrowthPlan, expansion: int) -> list[nn.Module]:
    """The blocks that expansion number ``expansion`` of ``plan`` added to ``model`` (grown by it)."""
    source, target = plan.depths[expansion], plan.depths[expansion + 1]
    slots = new_slots(slot_sources(plan.init, source, target))
    return [stack[slot] for stack in model.block_stacks().values() for slot in slots]


def updated_ramp(ramp: ResidualRamp | None, model: nn.Module, plan: GrowthPlan, step: int) -> ResidualRamp | None:
    """The ramp ``model`` needs at ``step`` with its factor set: ``ramp`` itself, a new one after an
    expansion (or on a resume inside a ramp), or None once the ramp is over (its hooks removed)."""
    active = plan.ramp_at(step)
    if active is not None and model.config.n_layer != plan.depths[active[0] + 1]:
        active = None  # the evaluation just before the expansion of this very step
    if ramp is not None and (active is None or active[0] != ramp.expansion):
        ramp.remove()
        ramp = None
    if active is None:
        return None
    expansion, value = active
    if ramp is None:
        ramp = ResidualRamp(model, new_blocks(model, plan, expansion), expansion)
    ramp.set(value)
    return ramp
