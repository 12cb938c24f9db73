"""Optimizers: parameter groups, AdamW and Muon-NSGD, and a chain that steps several as one.

Every group carries a ``role`` (which rule put its parameters there) and an ``initial_lr`` (its peak
learning rate); the trainer sets ``lr = initial_lr · multiplier(step)``. :func:`check_coverage` asserts
that each trainable parameter sits in exactly one group, at build time and after every growth.

Muon-NSGD is the paper's optimizer: ``torch.optim.Muon`` (orthogonalised momentum) on the hidden 2-D
matrices - the 2-D weights inside the block stacks - and normalised SGD on every other tensor
(embeddings, norms, biases), all with one shared learning rate and weight decay (not applied to the
1-D gains and biases, as with AdamW).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer

OptimizerName = Literal["adamw", "muon-nsgd"]
# what each optimizer uses for a learning rate or weight decay the config leaves unset
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "adamw": {"lr": 3e-3, "weight_decay": 0.1},
    "muon-nsgd": {"lr": 0.01, "weight_decay": 0.01},  # the paper's weight decay
}


@dataclass(kw_only=True)
class OptimConfig:
    name: OptimizerName = "muon-nsgd"
    lr: float | None = None  # peak learning rate, shared by every group; none: the optimizer's default
    weight_decay: float | None = None  # decoupled, on tensors of 2+ dims only; none: the optimizer's default
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    eps: float = 1e-8  # AdamW
    momentum: float = 0.95  # Muon and normalised SGD (Nesterov)

    def resolved(self) -> OptimConfig:
        """This config with the optimizer's defaults filled in where it leaves lr or weight decay unset."""
        defaults = OPTIMIZER_DEFAULTS[self.name]
        return dataclasses.replace(
            self,
            lr=defaults["lr"] if self.lr is None else self.lr,
            weight_decay=defaults["weight_decay"] if self.weight_decay is None else self.weight_decay,
        )

    def problems(self) -> list[str]:
        found = []
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            found.append(f"optim.lr must be a finite number > 0, got {self.lr}")
        if self.weight_decay is not None and not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            found.append(f"optim.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            found.append(f"optim.eps must be a finite number > 0, got {self.eps}")
        for name in ("beta1", "beta2", "momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                found.append(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        return found


class NormalizedSGD(Optimizer):
    """SGD with momentum whose every step has the same length, per tensor:

    ``m <- lerp(m, g, 1 - momentum)``, ``u = lerp(g, m, momentum)`` (Nesterov) or ``m``,
    ``p <- p · (1 - lr · weight_decay) - lr · u / (||u|| + eps)``.

    The update's norm is ``lr`` whatever the gradient's scale, which is what lets one learning rate
    serve every tensor beside Muon's orthogonalised (unit spectral norm) updates.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                p.mul_(1 - lr * weight_decay)
                p.add_(update / (update.norm() + group["eps"]), alpha=-lr)
        return loss


class OptimizerChain:
    """Several torch optimizers stepped as one, with the parameter groups of all of them.

    ``config`` is the recipe it was built from, so that growth can rebuild it for the grown model.
    Checkpoints save ``optimizers`` through ``torch.distributed.checkpoint.state_dict``, keyed by
    parameter name.
    """

    def __init__(self, optimizers: list[Optimizer], config: OptimConfig | None = None) -> None:
        self.optimizers = optimizers
        self.config = config

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> Mapping[torch.Tensor, dict[str, Any]]:
        """A read-only view of every optimizer's state (write through ``optimizers[i].state``)."""
        return MappingProxyType({p: s for optimizer in self.optimizers for p, s in optimizer.state.items()})

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def set_lr_multiplier(self, multiplier: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * multiplier

    def __iter__(self) -> Iterator[Optimizer]:
        return iter(self.optimizers)


def hidden_matrix_names(model: nn.Module) -> set[str]:
    """Names of the 2-D weights inside the block stacks (what Muon orthogonalises)."""
    prefixes = tuple(f"{prefix}." for prefix in model.block_stacks())
    return {name for name, p in model.named_parameters() if p.ndim == 2 and name.startswith(prefixes)}


def build_optimizer(model: nn.Module, config: OptimConfig) -> OptimizerChain:
    config = config.resolved()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if config.name == "adamw":
        roles = {
            "decay": [p for _, p in named if p.ndim >= 2],
            "no_decay": [p for _, p in named if p.ndim < 2],
        }
        groups = [
            {"params": params, "role": role, "weight_decay": config.weight_decay if role == "decay" else 0.0}
            for role, params in roles.items()
            if params
        ]
        optimizers = [
            torch.optim.AdamW(
                _with_lr(groups, config.lr),
                lr=config.lr,
                betas=(config.beta1, config.beta2),
                eps=config.eps,
                weight_decay=config.weight_decay,
                # one fused kernel for all parameters on a GPU; the default (foreach) elsewhere
                fused=True if named and all(p.device.type == "cuda" for _, p in named) else None,
            )
        ]
    else:
        matrices = hidden_matrix_names(model)
        muon_params = [p for name, p in named if name in matrices]
        other_params = [p for name, p in named if name not in matrices]
        optimizers = []
        if muon_params:
            optimizers.append(
                torch.optim.Muon(
                    _with_lr([{"params": muon_params, "role": "matrix"}], config.lr),
                    lr=config.lr,
                    weight_decay=config.weight_decay,
                    momentum=config.momentum,
                    nesterov=True,
                )
            )
        # as with AdamW, norms' gains and biases are not decayed (decay would pull gains towards 0)
        other_groups = [
            {"params": [p for p in other_params if p.ndim >= 2], "role": "other", "weight_decay": config.weight_decay},
            {"params": [p for p in other_params if p.ndim < 2], "role": "other_no_decay", "weight_decay": 0.0},
        ]
        other_groups = [group for group in other_groups if group["params"]]
        if other_groups:
            optimizers.append(
                NormalizedSGD(
                    _with_lr(other_groups, config.lr),
                    lr=config.lr,
                    weight_decay=config.weight_decay,
                    momentum=config.momentum,
                )
            )
    chain = OptimizerChain(optimizers, config)
    check_coverage(model, chain)
    return chain


def _with_lr(groups: list[dict[str, Any]], lr: float) -> list[dict[str, Any]]:
    return [{**group, "initial_lr": lr} for group in groups]


def as_optimizer_list(optimizer: Optimizer | OptimizerChain | Iterable[Optimizer]) -> list[Optimizer]:
    if isinstance(optimizer, Optimizer):
        return [optimizer]
    return list(optimizer)


def check_coverage(model: nn.Module, optimizer: Optimizer | OptimizerChain | Iterable[Optimizer]) -> None:
    """Raise if a trainable parameter is in no group or in more than one."""
    seen: dict[int, int] = {}
    for opt in as_optimizer_list(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                seen[id(p)] = seen.get(id(p), 0) + 1
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    repeated = [name for name, p in model.named_parameters() if seen.get(id(p), 0) > 1]
    if missing or repeated:
        raise RuntimeError(f"optimizer coverage broken: missing {missing}, in several groups {repeated}")
