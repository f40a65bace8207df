"""Ranks: the torchrun environment, process group (gloo on CPU, nccl on CUDA), small collective helpers.

Launch with ``torchrun --nproc_per_node N -m minillm_fast.distill --config run.yaml``; a single process needs no
launcher. Every helper is a no-op without an initialised process group, so the same code runs on one process.

What is split across ranks: each global batch (rank r takes the r-th contiguous share), the rollout generation
chunks of a MiniLLM collection (chunk c goes to rank c mod world_size, and its sampling seed depends on c only, so
the rollouts do not depend on the number of ranks), and the pre-training batch. Losses are divided by the token
count of the whole global batch (all-reduced) and multiplied by the world size, so DDP's gradient average gives
the gradient of the global batch.

(Named ``ranks`` rather than ``dist`` so that ``dist`` keeps meaning ``torch.distributed`` everywhere in the package.)
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device: str = "auto") -> DistEnv:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
    or reuse one already initialised; one process without them."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                      timeout=datetime.timedelta(minutes=30))
    else:
        rank, world, local = 0, 1, 0
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return DistEnv(rank, world, local, dev)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In place (returns ``t``)."""
    if initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    if initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def all_gather_object(obj: Any) -> list:
    if not initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if initialized():
        dist.barrier()


def wrap_ddp(module: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    if env.world_size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids: Optional[list] = [env.local_rank] if env.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def destroy(*, finished: bool = True) -> None:
    """Tear the process group down. After a run that ``finished`` every rank first waits for the others: a rank that
    tears gloo down while a peer still has a collective in flight (FSDP's last reduce-scatter, a checkpoint's
    gather) can abort the peer at exit ("terminate called without an active exception"). After an error no rank
    waits: the peers may never arrive."""
    if initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
