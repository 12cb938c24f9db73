"""Optimizers: parameter groups, AdamW and Muon-NSGD, and a chain that steps several as one.

Every group carries a ``role`` (which rule put its parameters there) and an ``initial_lr`` (its peak
learning rate); the trainer sets ``lr = initial_lr · multiplier(step)``. :func:`check_coverage` asserts
that each trainable parameter sits in exactly one group, at build time and after every growth.

Muon-NSGD is the paper's optimizer (Bu, arXiv 2511.04981; defined in Bu, Xu, Mao, arXiv 2602.07145 as
"optimizing all 2D tensors with Muon and other tensors with normalized SGD, using a single learning
rate"): Muon (orthogonalised momentum) on every weight matrix - token and position embeddings, the LM
head tied or not, the blocks' matrices, a mixture of experts' experts and router, a ResNet's conv kernels
(as out x in·kh·kw matrices) and classifier - and normalised SGD on the rest (norm gains, biases), one
learning rate, weight decay 0.01 on the matrices (not on gains and biases, as with AdamW).
``muon_scope="blocks"`` is the narrower split this package used before: Muon on the 2-D weights inside
the block stacks only, normalised SGD (with decay) on embeddings and head; kept as an ablation.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.optim._muon import _adjust_lr  # the step scale, exactly as torch's Muon computes it

from depthgrow.docfield import doc_field

OptimizerName = Literal["adamw", "muon-nsgd"]
MuonScope = Literal["all", "blocks"]
MuonAdjustLr = Literal["original", "match_rms_adamw"]
# what each optimizer uses for a learning rate or weight decay the config leaves unset
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "adamw": {"lr": 3e-3, "weight_decay": 0.1},
    "muon-nsgd": {"lr": 0.01, "weight_decay": 0.01},  # the paper's weight decay
}


def _default_text(setting: str) -> str:
    return ", ".join(f"{name} {defaults[setting]:g}" for name, defaults in OPTIMIZER_DEFAULTS.items())


@dataclass(kw_only=True)
class OptimConfig:
    name: OptimizerName = doc_field(
        "muon-nsgd",
        "muon-nsgd (the paper's: Muon on weight matrices, normalised SGD on the rest) or adamw; another optimizer "
        "brings its own lr and weight_decay unless they are given too",
    )
    lr: float | None = doc_field(
        None, f"peak learning rate, shared by every group; none: the optimizer's default ({_default_text('lr')})"
    )
    weight_decay: float | None = doc_field(
        None,
        f"decoupled, on tensors of 2+ dims only; none: the optimizer's default ({_default_text('weight_decay')})",
    )
    beta1: float = doc_field(0.9, "AdamW's first-moment decay")
    beta2: float = doc_field(0.95, "AdamW's second-moment decay")
    eps: float = doc_field(1e-8, "AdamW's denominator epsilon")
    momentum: float = doc_field(0.95, "the Nesterov momentum of Muon and normalised SGD")
    muon_scope: MuonScope = doc_field(
        "all",
        "Muon-NSGD: which matrices Muon trains: all (the paper's: every weight matrix, embeddings and head "
        "included) or blocks (only those inside the block stacks; embeddings and head on normalised SGD)",
    )
    muon_adjust_lr: MuonAdjustLr = doc_field(
        "original",
        "Muon's per-matrix step scale (torch.optim.Muon's adjust_lr_fn): original sqrt(max(1, rows/cols)), "
        "match_rms_adamw 0.2·sqrt(max(rows, cols))",
    )

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


# torch.optim.Muon's own hyperparameter defaults (Newton-Schulz coefficients and steps, eps, ...)
_TORCH_MUON_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(torch.optim.Muon.__init__).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` for weights of two or more dimensions: a conv kernel (out, in, kh, kw) is
    orthogonalised, and its step scaled, as the (out, in·kh·kw) matrix it applies; a 2-D weight exactly as
    torch does. Momentum buffers keep the parameter's shape, so checkpoints and sharding see ordinary state.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = _TORCH_MUON_DEFAULTS["lr"],
        weight_decay: float = _TORCH_MUON_DEFAULTS["weight_decay"],
        momentum: float = _TORCH_MUON_DEFAULTS["momentum"],
        nesterov: bool = _TORCH_MUON_DEFAULTS["nesterov"],
        ns_coefficients: tuple[float, float, float] = _TORCH_MUON_DEFAULTS["ns_coefficients"],
        eps: float = _TORCH_MUON_DEFAULTS["eps"],
        ns_steps: int = _TORCH_MUON_DEFAULTS["ns_steps"],
        adjust_lr_fn: str | None = _TORCH_MUON_DEFAULTS["adjust_lr_fn"],
    ) -> None:
        # torch's __init__ refuses any tensor that is not 2-D; its checks of the values are OptimConfig's
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        Optimizer.__init__(self, params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon trains tensors of 2 or more dimensions, got one of shape {tuple(p.shape)}")

    def _init_group(self, group: dict[str, Any], params: list, grads: list, buffers: list) -> bool:
        has_complex = super()._init_group(group, params, grads, buffers)
        for tensors in (params, grads, buffers):
            # views: torch's update writes through them into the parameter and its buffer
            tensors[:] = [t if t.ndim == 2 else t.view(t.shape[0], -1) for t in tensors]
        return has_complex

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """torch's Muon step, with the Newton-Schulz iterations of all same-shaped matrices of a group run as
        one batch: a mixture of experts has dozens of small expert matrices, whose one-by-one iterations were
        most of a training step on the CPU (91 of 143 ms for moe-micro-bpe). Equal to torch's bit for bit on
        the CPU (tested); on a GPU a batched matmul may pick another kernel. Sharded (DTensor) parameters
        take torch's own step."""
        if any(isinstance(p, DTensor) for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            momentum, lr = group["momentum"], group["lr"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            for batch in _same_shape_batches(params):
                # each update cast to bfloat16 as it is made (torch's iteration runs in bfloat16), so that only
                # one batch is held, and in half the memory of the float32 updates
                updates = torch.stack(
                    [
                        (grads[i].lerp(buffers[i], momentum) if group["nesterov"] else buffers[i]).bfloat16()
                        for i in batch
                    ]
                )
                orthogonal = _newton_schulz(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
                for position, i in enumerate(batch):
                    params[i].mul_(1 - lr * group["weight_decay"])
                    step_size = _adjust_lr(lr, group["adjust_lr_fn"], params[i].shape)
                    params[i].add_(orthogonal[position], alpha=-step_size)
        return loss


# at most this many elements per batch of same-shaped matrices (512 MiB in bfloat16): a 7B model's Muon
# matrices are tens of GB, which one batch would hold a second time
_BATCH_ELEMENTS = 2**28


def _same_shape_batches(params: list[torch.Tensor]) -> list[list[int]]:
    """The indices of ``params``, grouped by shape, each group cut into batches of at most _BATCH_ELEMENTS."""
    by_shape: dict[torch.Size, list[int]] = {}
    for index, param in enumerate(params):
        by_shape.setdefault(param.shape, []).append(index)
    batches = []
    for shape, indices in by_shape.items():
        size = max(1, _BATCH_ELEMENTS // shape.numel())
        batches += [indices[start : start + size] for start in range(0, len(indices), size)]
    return batches


def _newton_schulz(x: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """torch's Newton-Schulz orthogonalisation (``torch.optim._muon._zeropower_via_newtonschulz``: the wide
    orientation, Frobenius norm scaled to 1, then the quintic iteration) of each matrix of the bfloat16 batch
    ``x`` (K, m, n)."""
    a, b, c = coefficients
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


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
    """Names of the 2-D weights inside the block stacks."""
    prefixes = tuple(f"{prefix}." for prefix in model.block_stacks())
    return {name for name, p in model.named_parameters() if p.ndim == 2 and name.startswith(prefixes)}


def muon_parameter_names(model: nn.Module, scope: MuonScope) -> set[str]:
    """The parameters Muon-NSGD gives to Muon: every tensor of 2+ dimensions (``all``, the paper's), or
    the 2-D weights inside the block stacks (``blocks``)."""
    if scope == "blocks":
        return hidden_matrix_names(model)
    return {name for name, p in model.named_parameters() if p.ndim >= 2}


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
        matrices = muon_parameter_names(model, config.muon_scope)
        muon_params = [p for name, p in named if name in matrices]
        other_params = [p for name, p in named if name not in matrices]
        optimizers = []
        if muon_params:
            optimizers.append(
                Muon(
                    _with_lr([{"params": muon_params, "role": "matrix"}], config.lr),
                    lr=config.lr,
                    weight_decay=config.weight_decay,
                    momentum=config.momentum,
                    nesterov=True,
                    adjust_lr_fn=config.muon_adjust_lr,
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
    if optimizers:  # what a model updates from the step's forwards, not from gradients (an MoE's balance)
        optimizers[0].register_step_pre_hook(lambda optimizer, args, kwargs: model.before_optimizer_step())
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
