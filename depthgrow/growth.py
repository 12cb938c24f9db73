"""Depth expansion in one call: :func:`grow` a model and its optimizer to a target depth.

Growth is a pure operation on the *unwrapped* model: it rebuilds each block stack at the target depth,
initialises the new slots, and returns an optimizer that holds every parameter, with state carried by
parameter name. The caller takes wrappers (DDP, FSDP, torch.compile) off before and puts them back after.

Where each target slot's block comes from (k source blocks, L target slots):

==============  ===============================================  ========================================
init            slot i of L                                      new blocks' residual outputs
==============  ===============================================  ========================================
``random``      block i for i < k, else a fresh block             as a fresh depth-L model's
``zero``        block i for i < k, else a fresh block             zeroed (the function is preserved)
``copy``        block i mod k (the stack repeated: 1..k,1..k,..)  copied
``copy_zero``   block i mod k                                     zeroed in the copies
``copy_inter``  block floor(i·k/L) (each repeated in place)       copied
``copy_last``   block i for i < k, else block k-1                 copied
``copy_middle`` the middle L-k blocks repeated in place (MIDAS:   copied
                0,1,2,3 -> 0,1,2,1,2,3), needs L-k <= k
==============  ===============================================  ========================================

The first slot that takes a source block keeps that very block (its parameters survive under the new
slot's name, with their optimizer state); the other slots get copies. A fresh block is initialised exactly
as slot i of a fresh depth-L model with the same seed would be (``init_block``), residual projections
scaled for the target depth.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import nn
from torch.optim import Optimizer

from depthgrow.docfield import doc_field
from depthgrow.optim import OptimizerChain, as_optimizer_list, build_optimizer, check_coverage

Init = Literal["random", "copy", "copy_inter", "copy_last", "copy_middle", "zero", "copy_zero"]
INITS: tuple[str, ...] = get_args(Init)
COPY_INITS = ("copy", "copy_inter", "copy_last", "copy_middle", "copy_zero")
ZEROED_INITS = ("zero", "copy_zero")


Method = Literal["bu", "gstack", "midas", "msg", "lemon"]
METHODS: tuple[str, ...] = get_args(Method)


@dataclass(kw_only=True)
class GrowthConfig:
    method: Method = doc_field(
        "bu",
        "how the run grows (depthgrow.methods): bu (the paper's: source_depth -> n_layer once, at growth.at), "
        "gstack (a source of n_layer/stack_factor blocks stacked), midas (stages duplicating the middle blocks), "
        "msg (new blocks' outputs ramped in from 0) or lemon (function-preserving, then a decay from the growth)",
    )
    source_depth: int | None = doc_field(None, "depth before growth; none: a fixed-depth run at model.n_layer")
    at: list[float] = doc_field(
        [0.8],
        "expansion times, one per expansion: fractions of T below 1, whole steps from 1 (1.0 is refused as "
        "ambiguous); on the command line auto: the step depthgrow calibrate recommends",
    )
    via: list[int] = doc_field([], "intermediate depths of a multi-stage run (ablation), e.g. 2 for 0 -> 2 -> L")
    init: Init = doc_field(
        "random",
        "how new slots are filled: random or zero (fresh blocks; zero: their residual outputs zeroed), copy, "
        "copy_zero, copy_inter, copy_last or copy_middle (from the trained blocks); see depthgrow.growth",
    )
    copy_optimizer_state: bool = doc_field(False, "copied blocks also copy their source's optimizer state")
    stack_factor: int = doc_field(
        4,
        "gstack: g, the source of n_layer/g blocks is stacked g-fold; midas: the number of stages, each adding "
        "n_layer/g blocks (the source depth is n_layer/g for both)",
    )
    prop_alpha: float = doc_field(
        1.0, "midas: stage i of k lasts a share of T proportional to i**prop_alpha (1: PROP-1, stages 1:2:3:4)"
    )
    ramp: float = doc_field(
        0.05,
        "msg: how long the new blocks' residual outputs take to rise from 0 to 1 after each expansion: whole "
        "steps from 1, or a fraction of T below 1",
    )

    def __post_init__(self) -> None:
        # a step is kept a whole number, so that a saved config spells it as one (1, not the ambiguous 1.0)
        self.at = [int(value) if value >= 1 and float(value).is_integer() else value for value in self.at]
        if self.ramp >= 1 and float(self.ramp).is_integer():
            self.ramp = int(self.ramp)

    def problems(self) -> list[str]:
        if not all(math.isfinite(value) for value in self.at):
            return [f"growth.at must be finite, got {self.at}"]
        if self.source_depth == 0 and self.init in COPY_INITS:
            return [
                f"growth.init={self.init} copies trained blocks, but a zero-layer source has none; "
                "grow a zero-layer model with random or zero"
            ]
        return []


def ambiguous_at(raw: Any) -> str | None:
    """A message if ``growth.at`` as written (a TOML value or the command line's text) holds 1 spelled as
    a fraction (1.0): values below 1 are fractions of T and whole numbers steps, so it would mean step 1
    where the user may have meant the whole run."""
    items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, list) else [raw]
    for item in items:
        text = item.strip() if isinstance(item, str) else None
        spelled_as_fraction = isinstance(item, float) or (text is not None and text != "1")
        with contextlib.suppress(TypeError, ValueError):
            if spelled_as_fraction and float(item) == 1.0:
                return (
                    f"growth.at value {item} is ambiguous: values below 1 are fractions of T and whole numbers "
                    "are steps; write growth.at=1 for an expansion after the first step, or a fraction below 1 "
                    "(e.g. growth.at=0.99) for one near the end of the run"
                )
    return None


OptimizerLike = Optimizer | OptimizerChain | list[Optimizer]


class Grown(NamedTuple):
    model: nn.Module
    optimizer: OptimizerLike
    new_parameters: list[str]  # names of parameters that did not exist before (fresh or copied)


def slot_sources(init: str, source_depth: int, target_depth: int) -> list[int | None]:
    """For each target slot, the index of the source block it takes, or None for a fresh block."""
    k, L = source_depth, target_depth
    if init in ("random", "zero"):
        return [*range(k), *[None] * (L - k)]
    if k == 0:
        raise ValueError(f"init {init!r} copies trained blocks, but the model has none; use random or zero")
    if init in ("copy", "copy_zero"):
        return [i % k for i in range(L)]
    if init == "copy_inter":
        return [i * k // L for i in range(L)]
    if init == "copy_last":
        return [*range(k), *[k - 1] * (L - k)]
    if init == "copy_middle":
        added = L - k
        if added > k:
            raise ValueError(f"init copy_middle duplicates {added} middle blocks, but the model has only {k}")
        start = (k - added) // 2
        return [*range(start + added), *range(start, start + added), *range(start + added, k)]
    raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")


class Origin(NamedTuple):
    """Where a tensor of the grown model takes its value from."""

    name: str  # the parameter or buffer of the model before growth
    copied: bool  # from a copy of a source block (not the slot that keeps the block itself)


def source_names(plans: dict[str, list[int | None]], names: Iterable[str]) -> dict[str, Origin | None]:
    """For each parameter and buffer name of the grown model (``plans``: each stack's :func:`slot_sources`),
    its origin: the same name outside the block stacks, the source block's tensor for a slot that takes
    one, None in a fresh block."""
    origins: dict[str, Origin | None] = {}
    for name in names:
        origins[name] = Origin(name, False)
        for prefix, slots in plans.items():
            if name.startswith(f"{prefix}."):
                index, _, suffix = name[len(prefix) + 1 :].partition(".")
                source = slots[int(index)]
                copied = source is not None and slots.index(source) != int(index)
                origins[name] = None if source is None else Origin(f"{prefix}.{source}.{suffix}", copied)
                break
    return origins


def new_slots(sources: list[int | None]) -> list[int]:
    """The slots of a grown stack that hold a new block: a fresh one or a copy (the first slot that takes
    a source block keeps that very block)."""
    return [index for index, source in enumerate(sources) if source is None or sources.index(source) != index]


def grow(
    model: nn.Module,
    optimizer: OptimizerLike,
    target_depth: int,
    init: str = "random",
    *,
    seed: int = 0,
    copy_optimizer_state: bool = False,
    make_optimizer: Callable[[nn.Module], OptimizerLike] | None = None,
) -> Grown:
    """Grow ``model`` (in place) to ``target_depth`` blocks per stack and return it with a new optimizer.

    The optimizer is rebuilt for the grown model: with ``make_optimizer`` if given; from its recipe for a
    depthgrow :class:`OptimizerChain`; otherwise as the same torch optimizer class(es) with the same
    groups and hyperparameters, each new parameter joining the group of the parameter it was copied from
    or of its sibling in an existing block (a model with no block and several groups needs
    ``make_optimizer``). Surviving parameters keep their optimizer state (moments, step counts), keyed by
    name; new ones start with none, unless ``copy_optimizer_state`` copies it along with copied blocks.
    ``seed`` must be the seed the model was initialised with for fresh blocks to match a fresh model.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")
    source_depth = model.config.n_layer
    if target_depth <= source_depth:
        raise ValueError(f"target depth {target_depth} must exceed the current depth {source_depth}")

    old_names = {id(p): name for name, p in model.named_parameters()}
    fully_covered = _covers(model, optimizer)
    old_state = state_by_name(old_names, optimizer)

    plans = {prefix: slot_sources(init, len(stack), target_depth) for prefix, stack in model.block_stacks().items()}
    model.config = model.config.with_depth(target_depth)
    for prefix, stack in model.block_stacks().items():
        sources = plans[prefix]
        added = set(new_slots(sources))
        blocks: list[nn.Module] = []
        for index, source in enumerate(sources):
            if source is None:
                block = model.make_block(prefix).train(model.training)
                model.init_block(prefix, index, block, seed)
            elif index in added:
                block = copy.deepcopy(stack[source])
            else:
                block = stack[source]
            if init in ZEROED_INITS and index in added:
                _zero_(model.residual_projections(block))
            blocks.append(block)
        parent_name, _, attribute = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, nn.ModuleList(blocks))

    origins = source_names(plans, [name for name, _ in model.named_parameters()])
    renamed = {name: origin.name for name, origin in origins.items() if origin and not origin.copied}
    copied_from = {name: origin.name for name, origin in origins.items() if origin and origin.copied}
    added = [name for name in origins if name not in renamed]

    if make_optimizer is not None:
        new_optimizer = make_optimizer(model)
    elif isinstance(optimizer, OptimizerChain) and optimizer.config is not None:
        new_optimizer = build_optimizer(model, optimizer.config)
        carry_lr_multiplier(optimizer, new_optimizer)
    elif isinstance(optimizer, OptimizerChain):
        new_optimizer = OptimizerChain(_rebuild_like(optimizer.optimizers, model, old_names, renamed, copied_from))
    else:
        new_optimizer = _rebuild_like(optimizer, model, old_names, renamed, copied_from)

    carry_optimizer_state(new_optimizer, model, origins, old_state, copy_optimizer_state=copy_optimizer_state)
    if fully_covered:
        check_coverage(model, new_optimizer)
    return Grown(model, new_optimizer, added)


def _covers(model: nn.Module, optimizer: OptimizerLike) -> bool:
    try:
        check_coverage(model, optimizer)
    except RuntimeError:
        return False
    return True


def state_by_name(names: dict[int, str], optimizer: OptimizerLike) -> dict[str, dict[str, Any]]:
    """The optimizer state of each parameter named in ``names`` (parameter id -> name), by that name."""
    return {
        names[id(p)]: state for opt in as_optimizer_list(optimizer) for p, state in opt.state.items() if id(p) in names
    }


@torch.no_grad()
def _zero_(modules: Iterable[nn.Module]) -> None:
    for module in modules:
        for p in module.parameters():
            p.zero_()


def carry_optimizer_state(
    optimizer: OptimizerLike,
    model: nn.Module,
    origins: dict[str, Origin | None],
    old_state: dict[str, dict[str, Any]],
    *,
    copy_optimizer_state: bool,
) -> None:
    """Give each parameter of the grown ``model`` in ``optimizer`` the state of its origin (``old_state``:
    by parameter name before growth): a surviving parameter its own, a copy of a block's parameter a copy
    of it if ``copy_optimizer_state``, a fresh one none."""
    names = {id(p): name for name, p in model.named_parameters()}
    for opt in as_optimizer_list(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                origin = origins.get(names[id(p)])
                if origin is None or origin.name not in old_state:
                    continue
                if not origin.copied:
                    opt.state[p] = old_state[origin.name]
                elif copy_optimizer_state:
                    opt.state[p] = clone_state(old_state[origin.name])


def clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in state.items()}


def carry_lr_multiplier(old: OptimizerChain, new: OptimizerChain) -> None:
    """New groups start at the schedule position of the old ones (no re-warmup)."""
    reference = next(g for g in old.param_groups if "initial_lr" in g)
    new.set_lr_multiplier(reference["lr"] / reference["initial_lr"])


def _rebuild_like(
    optimizer: OptimizerLike,
    model: nn.Module,
    old_names: dict[int, str],
    renamed: dict[str, str],
    copied_from: dict[str, str],
) -> OptimizerLike:
    """The same optimizer class(es) and groups over the grown model's parameters."""
    optimizers = as_optimizer_list(optimizer)
    where: dict[str, tuple[int, int]] = {}  # old parameter name -> (optimizer, group)
    for o, opt in enumerate(optimizers):
        for g, group in enumerate(opt.param_groups):
            for p in group["params"]:
                where[old_names[id(p)]] = (o, g)
    stacks = tuple(model.block_stacks())
    groups = [[{**group, "params": []} for group in opt.param_groups] for opt in optimizers]
    single_group = len({*where.values()}) == 1
    for name, p in model.named_parameters():
        template = renamed.get(name) or copied_from.get(name) or _sibling(name, stacks, where)
        if template in where:
            o, g = where[template]
        elif template is None and single_group:
            o, g = next(iter(where.values()))
        elif template is None:
            raise ValueError(
                f"cannot tell which parameter group the new parameter {name} belongs to (the model had no "
                "block to take it from); pass make_optimizer= to build the grown model's optimizer"
            )
        else:
            continue  # its template was left out of the optimizer, so it is left out too
        groups[o][g]["params"].append(p)
    rebuilt = [_same_class(opt, opt_groups) for opt, opt_groups in zip(optimizers, groups, strict=True)]
    return rebuilt[0] if isinstance(optimizer, Optimizer) else rebuilt


def _sibling(name: str, stacks: tuple[str, ...], where: dict[str, tuple[int, int]]) -> str | None:
    """The same parameter in any existing block of the same stack, if there is one."""
    for prefix in stacks:
        if name.startswith(f"{prefix}."):
            suffix = _block_suffix(name, prefix)
            return next((old for old in where if _block_suffix(old, prefix) == suffix), None)
    return None


def _block_suffix(name: str, prefix: str) -> str | None:
    """``"h.3.attn.c_attn.weight"`` under prefix ``"h"`` -> ``"attn.c_attn.weight"``."""
    if not name.startswith(f"{prefix}."):
        return None
    return name[len(prefix) + 1 :].partition(".")[2]


def _same_class(optimizer: Optimizer, groups: list[dict[str, Any]]) -> Optimizer:
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {key: value for key, value in optimizer.defaults.items() if key in accepted}
    return type(optimizer)([group for group in groups if group["params"]], **defaults)
