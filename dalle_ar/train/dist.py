"""Data-parallel helpers for recipes: process group from torchrun's environment, DDP or FSDP
wrapping, reductions, and full (unsharded) state for checkpoints.

A recipe runs unchanged as one process or under `torchrun --nproc_per_node=N`: with WORLD_SIZE
unset everything here is a no-op. The backend is NCCL on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dalle_ar.runtime import pick_device

log = logging.getLogger(__name__)

PARALLEL = ("ddp", "fsdp")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank
    world: int  # number of processes
    local_rank: int  # rank on this machine (picks the GPU)
    device: torch.device  # where this process computes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        log.info("process group: rank %d of %d (%s)", rank, world, backend)
    return DistInfo(rank, world, local_rank, dev)


def is_main_process() -> bool:
    """Rank 0 under torchrun (its RANK variable), or the only process: the one that prints.
    Reads the environment, so it holds after the process group is gone."""
    return int(os.environ.get("RANK", "0")) == 0


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, parallel: str, blocks: Any = None) -> nn.Module:
    """DDP (replicated weights) or FSDP (sharded weights, per block and at the root). One
    process: the model unchanged."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if not info.distributed:
        return model
    if parallel == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for block in blocks or []:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on accumulation micro-batches before the last."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def rank_rows(b: int, rank: int = 0, world: int = 1) -> tuple[int, slice]:
    """(global batch size, this rank's rows of it) for a per-rank batch of b: draws made for the
    global batch from one seeded generator and sliced by rank give every rank what one process
    with the global batch would draw."""
    if not 0 <= rank < world:
        raise ValueError(f"expected 0 <= rank < world, got rank {rank}, world {world}")
    return world * b, slice(rank * b, (rank + 1) * b)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: float) -> float:
    """The largest of every rank's value (ranks agree on clock-based decisions)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t` (B, ...) concatenated in rank order (world * B, ...), with
    autograd through the gather: the gradient of each row goes back to the rank that holds it,
    summed over every rank's loss (torch.distributed.nn's all_gather). Equal B on every rank.
    `t` itself for one process."""
    if not dist.is_initialized():
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous()))


def raise_together(error: BaseException | None) -> None:
    """Every rank calls this at the same point with the error it met there, or None. When any
    rank met one, every rank raises: its own, or a ValueError naming the ranks that failed and
    why. Without it a rank that raises alone leaves the others waiting for it in their next
    collective, forever. One process: its own error, if any."""
    if not dist.is_initialized():
        if error is not None:
            raise error
        return
    if all_reduce_max(float(error is not None)) == 0:
        return
    said = all_gather_object(None if error is None else str(error))
    if error is not None:
        raise error
    failed = "; ".join(f"rank {r}: {m}" for r, m in enumerate(said) if m is not None)
    raise ValueError(f"another rank failed ({failed})")


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; [obj] for one process."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def fingerprint(t: torch.Tensor) -> str:
    """A hash of a tensor's bytes: replicas compare these instead of sending the tensors."""
    flat = t.detach().contiguous().reshape(-1).cpu()
    return hashlib.sha1(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def check_replicas(model: nn.Module) -> None:
    """Raise RuntimeError naming the first parameter or buffer whose value differs between ranks
    (replicated models only: rank 0 alone writes what every rank is meant to hold)."""
    if not dist.is_initialized():
        return
    mine = {name: fingerprint(t) for name, t in model.state_dict().items()}
    for rank, theirs in enumerate(all_gather_object(mine)):
        diff = [name for name in mine if theirs.get(name) != mine[name]]
        if diff:
            raise RuntimeError(
                f"rank {rank} and rank {dist.get_rank()} hold different values of "
                f"{', '.join(diff[:5])}: the replicas diverged"
            )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class StateView:
    """A state dict dressed as a module/optimizer for `Run.save` (which calls `.state_dict()`)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """(model, optimizer) objects whose state_dict() is the full, unsharded state on the CPU.
    With FSDP this is a collective: every rank must call it."""
    if not is_fsdp(model):
        return unwrap(model), optimizer
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    return StateView(msd), StateView(osd)


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
) -> None:
    """Load full (unsharded) states into an FSDP model and its optimizer (every rank)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
