"""This process's place in a torchrun job, and the few collectives training needs.

Started without torchrun, a process is rank 0 of 1 and every helper here is a no-op, so the
training code reads the same either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .device import resolve_device
from .errors import UserError

# How long a rank waits in a collective. At epoch ends the other ranks wait in a barrier while
# rank 0 draws the sample grids and (train.eval_every) scores FID/KID on the test sets, which can
# take longer than NCCL's default 10 minutes on large test sets.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Distributed:
    """Rank `rank` of `world` processes; rank 0 of 1 when started without torchrun."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """[obj of rank 0, obj of rank 1, ...] on rank 0 (None on the others)."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's obj on every rank: one disk read, and no shared file system needed across nodes."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def reduce(self, values: torch.Tensor, op: str) -> torch.Tensor:
        """`values` reduced over the ranks, in place: op is "sum", "min" or "max"."""
        if self.active:
            dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                        "max": dist.ReduceOp.MAX}[op])
        return values

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of `values`, in place."""
        if self.active:
            self.reduce(values, "sum")
            values /= self.world
        return values


def join(device_setting: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, ...), if any.

    Returns this process's place and its device: on GPUs, one per local rank.
    """
    device = resolve_device(device_setting, "train.device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {rank} wants GPU {local_rank} but {torch.cuda.device_count()} are "
                            f"visible; "
                            f"lower torchrun's --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return Distributed(dist.get_rank(), dist.get_world_size()), device


def leave(ddp: Distributed) -> None:
    if ddp.active:
        dist.destroy_process_group()
