"""Data parallelism as the loop uses it: torchrun's env vars, one process group, summed gradients.

Under torchrun (WORLD_SIZE > 1) each rank takes its shard of every global batch and gradients are
summed with one bucketed all-reduce per optimizer step (gloo on CPU, NCCL on GPU) -- DDP's
arithmetic, done once per step instead of hooked into backward, which keeps the stages free to
call model parts (lm_head, value heads) outside `forward`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this call created the process group and must destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's env vars; start a process group when WORLD_SIZE > 1 (NCCL on GPU, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        owns = True
    return DistInfo(rank, world, local, dev, owns)


def barrier(di: DistInfo) -> None:
    if di.world > 1:
        dist.barrier()


def all_reduce_(t: torch.Tensor, di: DistInfo) -> torch.Tensor:
    if di.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(params: list[nn.Parameter], di: DistInfo, bucket_numel: int = 1 << 24) -> None:
    """Sum gradients across ranks in flat buckets (a few large all-reduces instead of one per tensor)."""
    if di.world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1).float() for g in bucket])  # (sum numel,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for g in bucket:
            g.copy_(flat[off: off + g.numel()].view_as(g))
            off += g.numel()
        bucket.clear()

    for g in grads:
        bucket.append(g)
        size += g.numel()
        if size >= bucket_numel:
            flush()
            size = 0
    flush()
