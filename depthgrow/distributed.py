"""Running on several processes with PyTorch's own engine: torchrun, DDP, FSDP2 (``fully_shard``).

``torchrun --nproc_per_node N -m depthgrow train --train.parallel ddp|fsdp ...`` starts N processes;
each reads its rank from the environment torchrun sets, trains on its slice of every global batch
(every rank draws the same global batch, so the data order is that of a single process) and, under
FSDP2, holds a shard of every block and of the root. Growth works on the plain model: DDP's is inside
the wrapper; FSDP2's is rebuilt from the gathered full state, grown, and sharded again, the optimizer
state following by parameter name (see :func:`unwrapped_for_growth` and :func:`wrap`).
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
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from depthgrow.errors import DepthgrowError
from depthgrow.optim import OptimizerChain


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

    def barrier(self) -> None:
        if self.initialised:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@contextmanager
def world(parallel: str, device_name: str, batch_size: int) -> Iterator[tuple[World, str]]:
    """Join the process group torchrun set up (gloo on the CPU, NCCL on GPUs) for the run's duration;
    yield the world and the device this rank trains on. A run that ends normally waits at a barrier
    before leaving the group: without it, destroying the group while a peer still finished its last
    collective crashed about 1 run in 13. An error leaves at once (see below)."""
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
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise DepthgrowError(
            f"train.device={device_name} but local rank {local_rank} has no CUDA device of its own (this machine "
            f"has {torch.cuda.device_count()}); start at most that many processes per node, or use train.device=cpu"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    else:
        device_name = "cpu"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield World(rank=rank, size=size, local_rank=local_rank, parallel=parallel), device_name
    except BaseException:
        # no barrier on the way out of an error: the other ranks may be waiting in another collective
        # (an error on this rank only), and a barrier would hang this one with them; leaving lets
        # torchrun see the failure and stop the rest
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()


def wrap(model: nn.Module, world: World, *, compile_model: bool) -> nn.Module:
    """The model as the training step runs it: DDP, or FSDP2 with one unit per block and one at the root
    (``fully_shard`` shards in place: the module stays itself, its parameters become DTensors), then
    compiled if asked."""
    if world.parallel == "ddp":
        device_ids = [world.local_rank] if next(model.parameters()).is_cuda else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    elif world.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for stack in model.block_stacks().values():
            for block in stack:
                fully_shard(block)
        fully_shard(model)
    if compile_model:
        # the graphs of earlier models (before an expansion, or of an earlier run in this process) never run
        # again: dropped, or with two per model (train and eval) dynamo's recompile limit (8 per function)
        # sent the model back to eager from the fourth expansion on
        torch.compiler.reset()
        model = torch.compile(model)
    return model


def plain_module(model: nn.Module) -> nn.Module:
    """The model inside the compile and DDP wrappers (an FSDP2 model is its own module, sharded)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def _full(value: Any) -> Any:
    return value.full_tensor() if isinstance(value, DTensor) else value


def _like(key: str, value: Any, param: torch.Tensor, group: dict[str, Any]) -> Any:
    """Optimizer state ``value`` (a full tensor, or a scalar such as a step count) placed as ``param`` is,
    with torch's own rule for step counts: on the CPU unless the group is fused or capturable."""
    if not isinstance(value, torch.Tensor):
        return value
    if key == "step" and value.ndim == 0:
        on_device = group.get("fused") or group.get("capturable")
        return value.to(device=param.device, dtype=torch.float32) if on_device else value
    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value.to(param.device)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, unsharded (under FSDP2 every rank takes part in the gather)."""
    return {name: _full(value) for name, value in plain_module(model).state_dict().items()}


def optimizer_state_by_name(model: nn.Module, optimizer: OptimizerChain) -> dict[str, dict[str, Any]]:
    """Every parameter's optimizer state, keyed by parameter name, unsharded."""
    names = {id(p): name for name, p in plain_module(model).named_parameters()}
    return {
        names[id(p)]: {key: _full(value) for key, value in state.items()}
        for opt in optimizer.optimizers
        for p, state in opt.state.items()
    }


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
