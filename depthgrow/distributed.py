"""Running on several processes with PyTorch's own engine: torchrun, DDP, FSDP2 (``fully_shard``).

``torchrun --nproc_per_node N -m depthgrow train --train.parallel ddp|fsdp ...`` starts N processes;
each reads its rank from the environment torchrun sets, trains on its slice of every global batch
(every rank draws the same global batch, so the data order is that of a single process) and, under
FSDP2, holds a shard of every block and of the root. :func:`grow_wrapped` is the one place growth takes
the wrappers off and puts them back: DDP's and compile's model is grown inside them; an FSDP2 model is
grown shard by shard (:func:`grow_sharded`), so that no rank ever holds the full target model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from depthgrow.errors import DepthgrowError
from depthgrow.growth import (
    ZEROED_INITS,
    carry_lr_multiplier,
    carry_optimizer_state,
    grow,
    slot_sources,
    source_names,
    state_by_name,
)
from depthgrow.models import GrowableModel, ModelConfig, build_model, skeleton
from depthgrow.optim import OptimizerChain, build_optimizer, check_coverage


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; a single process is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    parallel: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialised(self) -> bool:
        return self.parallel != "none"

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch: contiguous slices, equal when the rows divide evenly (training
        batches always do); otherwise the first ranks take one row more and, with fewer rows than ranks,
        the last ones none (a short last validation batch of images), so every rank has a slice."""
        return batch.tensor_split(self.size)[self.rank] if self.size > 1 else batch

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (in place); the tensor itself for a single process."""
        if self.initialised:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The largest value over ranks (in place); the tensor itself for a single process."""
        if self.initialised:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def barrier(self) -> None:
        if self.initialised:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def main_process() -> bool:
    """Whether this process reports: rank 0 under torchrun, or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def world(parallel: str, device_name: str, batch_size: int) -> Iterator[tuple[World, str]]:
    """Join the process group torchrun set up (gloo on the CPU, NCCL on GPUs) for the run's duration;
    yield the world and the device this rank trains on. A run that ends normally waits at a barrier
    before leaving the group: without it, destroying the group while a peer still finished its last
    collective crashed about 1 run in 13. An error leaves at once (see below).

    Nested (a command that trains several runs, such as compare, holds the group for all of them), the
    inner runs use the group the outer call joined and leave it to that call."""
    if not launched_by_torchrun():
        if parallel != "none":
            raise DepthgrowError(
                f"train.parallel={parallel} needs several processes: launch with "
                "torchrun --nproc_per_node N -m depthgrow train ..."
            )
        yield World(), device_name
        return
    size, rank, local_rank = (int(os.environ[key]) for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if parallel == "none":
        if size > 1:
            raise DepthgrowError(
                f"launched by torchrun with {size} processes but train.parallel=none; pass --train.parallel ddp or fsdp"
            )
        yield World(), device_name
        return
    if batch_size % size:
        raise DepthgrowError(f"train.batch_size={batch_size} must be a multiple of the world size {size}")
    device_name = _rank_device(device_name, local_rank)
    ranks = World(rank=rank, size=size, local_rank=local_rank, parallel=parallel)
    if dist.is_initialized():
        yield ranks, device_name
        return
    dist.init_process_group(backend="nccl" if device_name.startswith("cuda") else "gloo")
    try:
        yield ranks, device_name
    except BaseException:
        # no barrier on the way out of an error: the other ranks may be waiting in another collective
        # (an error on this rank only), and a barrier would hang this one with them; leaving lets
        # torchrun see the failure and stop the rest
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()


@contextmanager
def joined(parallel: str, device_name: str, batch_size: int) -> Iterator[None]:
    """Hold the process group (under torchrun) across the runs of a command that trains several (compare,
    experiment, calibrate): each run's :func:`world` uses it, and the command leaves it once, at the end."""
    with world(parallel, device_name, batch_size):
        yield


def _rank_device(device_name: str, local_rank: int) -> str:
    """The device of this rank: its own GPU (by local rank) on CUDA, else the CPU."""
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return "cpu"
    if local_rank >= torch.cuda.device_count():
        raise DepthgrowError(
            f"train.device={device_name} but local rank {local_rank} has no CUDA device of its own (this machine "
            f"has {torch.cuda.device_count()}); start at most that many processes per node, or use train.device=cpu"
        )
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def build_wrapped(
    config: ModelConfig, world: World, *, seed: int, device: torch.device | str, compile_model: bool
) -> nn.Module:
    """The model the training step runs, drawn as :func:`~depthgrow.models.build_model` draws it: under
    FSDP2 built on the meta device, sharded, then drawn a block at a time (:func:`draw_in_pieces`), so that
    no rank holds the whole model; otherwise built whole, then wrapped (:func:`wrap`)."""
    if world.parallel != "fsdp":
        return wrap(build_model(config, seed=seed, device=device), world, compile_model=compile_model)
    model = skeleton(config)
    shard(model)
    model.to_empty(device=device)
    draw_in_pieces(model, seed)
    return _compiled(model, compile_model)


@torch.no_grad()
def draw_in_pieces(model: GrowableModel, seed: int) -> None:
    """Give an allocated (possibly sharded) model the values ``build_model`` draws, one piece drawn whole at a
    time and each rank keeping its shard of it: first all that lies outside the blocks (embeddings, head,
    norms: drawn from a stream of their own, the same at every depth, so a zero-layer model's), then each
    block from its slot's generator."""
    like = next(iter(model.parameters()))
    _keep_shards(build_model(model.config.with_depth(0), seed=seed, device=_local(like).device), model)
    for prefix, stack in model.block_stacks().items():
        for index in range(len(stack)):
            _draw_block(model, prefix, index, seed)


def _draw_block(model: GrowableModel, prefix: str, index: int, seed: int) -> None:
    """Draw block ``index`` of ``prefix`` whole, as a single process would, and keep this rank's shard."""
    full = model.make_block(prefix)
    model.init_block(prefix, index, full, seed)
    _keep_shards(full, model.block_stacks()[prefix][index])


def _keep_shards(whole: nn.Module, held: nn.Module) -> None:
    """Copy each parameter and buffer of ``whole`` (every rank holding all of it) into this rank's shard of
    the tensor of the same name in ``held``."""
    tensors = dict([*held.named_parameters(), *held.named_buffers()])
    for name, value in [*whole.named_parameters(), *whole.named_buffers()]:
        _local(tensors[name]).copy_(_shard_of(value, tensors[name]))


def wrap(model: nn.Module, world: World, *, compile_model: bool) -> nn.Module:
    """The model as the training step runs it: DDP, or FSDP2 (:func:`shard`), then compiled if asked."""
    if world.parallel == "ddp":
        device_ids = [world.local_rank] if next(model.parameters()).is_cuda else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    elif world.parallel == "fsdp":
        shard(model)
    return _compiled(model, compile_model)


def shard(model: nn.Module, mesh: DeviceMesh | None = None) -> None:
    """FSDP2 with one unit per block and one at the root (``fully_shard`` shards in place: the module stays
    itself, its parameters become DTensors); a model on the meta device stays there, sharded."""
    from torch.distributed.fsdp import fully_shard

    for stack in model.block_stacks().values():
        for block in stack:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _compiled(model: nn.Module, compile_model: bool) -> nn.Module:
    if compile_model:
        # the graphs of earlier models (before an expansion, or of an earlier run in this process) never run
        # again: dropped, or with two per model (train and eval) dynamo's recompile limit (8 per function)
        # sent the model back to eager from the fourth expansion on
        torch.compiler.reset()
        model = torch.compile(model)
    return model


def grow_wrapped(
    model: nn.Module,
    optimizer: OptimizerChain,
    world: World,
    target_depth: int,
    init: str,
    *,
    seed: int,
    copy_optimizer_state: bool,
    compile_model: bool,
) -> tuple[nn.Module, OptimizerChain]:
    """Grow the model the training step runs (plain, compiled, DDP or FSDP2) and return it wrapped as it was,
    with the one optimizer built for it (state carried by parameter name)."""
    plain = plain_module(model)
    if world.parallel == "fsdp":
        grown, optimizer = grow_sharded(
            plain, optimizer, target_depth, init, seed=seed, copy_optimizer_state=copy_optimizer_state
        )
        return _compiled(grown, compile_model), optimizer
    grown, optimizer, _ = grow(
        plain, optimizer, target_depth, init, seed=seed, copy_optimizer_state=copy_optimizer_state
    )
    return wrap(grown, world, compile_model=compile_model), optimizer


@torch.no_grad()
def grow_sharded(
    model: GrowableModel,
    optimizer: OptimizerChain,
    target_depth: int,
    init: str,
    *,
    seed: int,
    copy_optimizer_state: bool = False,
) -> tuple[GrowableModel, OptimizerChain]:
    """:func:`~depthgrow.growth.grow` for an FSDP2-sharded model, without the full target model on any rank.

    The target model is built on the meta device and sharded there, then allocated: each rank holds only
    its shards. Every surviving or copied parameter (and buffer) takes its shard from the source's, which is
    sharded the same way (same shape, same mesh); a fresh block is drawn whole, one block at a time, exactly
    as a single process draws it (per-slot generators), and each rank keeps its shard of it. The optimizer
    is built once, over the new shards; surviving parameters keep their (sharded) state by name."""
    resharded(model)
    mesh = next(model.parameters()).device_mesh
    device = next(model.parameters()).to_local().device
    target = skeleton(model.config.with_depth(target_depth))
    shard(target, mesh)
    target.to_empty(device=device)
    target.train(model.training)

    plans = {prefix: slot_sources(init, len(stack), target_depth) for prefix, stack in model.block_stacks().items()}
    sources = source_names(plans, [name for name, _ in [*target.named_parameters(), *target.named_buffers()]])
    old = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, tensor in [*target.named_parameters(), *target.named_buffers()]:
        if sources[name] is not None:
            _local(tensor).copy_(_local(old[sources[name].name]))
    for prefix, slots in plans.items():
        stack = target.block_stacks()[prefix]
        for index, source in enumerate(slots):
            if source is None:  # a fresh block: drawn whole, kept as this rank's shard
                _draw_block(target, prefix, index, seed)
            if init in ZEROED_INITS and (source is None or slots.index(source) != index):
                for module in target.residual_projections(stack[index]):
                    for p in module.parameters():
                        p.zero_()

    grown = build_optimizer(target, optimizer.config)
    carry_lr_multiplier(optimizer, grown)
    old_state = optimizer_state_by_name(model, optimizer)
    carry_optimizer_state(grown, target, sources, old_state, copy_optimizer_state=copy_optimizer_state)
    check_coverage(target, grown)
    return target, grown


def resharded(model: nn.Module) -> nn.Module:
    """``model`` with every FSDP2 unit holding its shards as its parameters: after a forward without a
    backward (an evaluation) the root keeps the gathered ones until the next forward, and parameters are
    known by identity (optimizer state, growth). A model that is not sharded is left as it is."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` when placed as ``like`` is (no communication: every rank holds ``full``)."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def plain_module(model: nn.Module) -> nn.Module:
    """The model inside the compile and DDP wrappers (an FSDP2 model is its own module, sharded)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def _like(key: str, value: Any, param: torch.Tensor, group: dict[str, Any]) -> Any:
    """Optimizer state ``value`` (a full tensor, or a scalar such as a step count) placed as ``param`` is,
    with torch's own rule for step counts: on the CPU unless the group is fused or capturable."""
    if not isinstance(value, torch.Tensor) or isinstance(value, DTensor):  # a DTensor is placed already
        return value
    if key == "step" and value.ndim == 0:
        on_device = group.get("fused") or group.get("capturable")
        return value.to(device=param.device, dtype=torch.float32) if on_device else value
    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value.to(param.device)


def optimizer_state_by_name(model: nn.Module, optimizer: OptimizerChain) -> dict[str, dict[str, Any]]:
    """Every parameter's optimizer state, keyed by parameter name, as this process holds it (sharded under
    FSDP2: :class:`~depthgrow.checkpoint.ShardedCheckpoints` writes it so)."""
    return state_by_name({id(p): name for name, p in plain_module(resharded(model)).named_parameters()}, optimizer)


def load_optimizer_state_by_name(model: nn.Module, optimizer: OptimizerChain, states: dict[str, dict]) -> None:
    """Give each parameter of ``model`` the state saved under its name (sharded as the parameter is);
    parameters with no saved state start fresh, exactly as in a single process."""
    names = {id(p): name for name, p in plain_module(model).named_parameters()}
    for opt in optimizer.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                saved = states.get(names[id(p)])
                if saved is not None:
                    opt.state[p] = {key: _like(key, value, p, group) for key, value in saved.items()}
