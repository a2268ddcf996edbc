"""This process's place in a torchrun job, and the few collectives training needs.

Started without torchrun, a process is rank 0 of 1 and every helper here is a no-op, so the
training code reads the same either way.
"""
from __future__ import annotations

import os
import signal
import sys
import uuid
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

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s obj on every rank: one disk read, and no shared file system needed across nodes."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

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
    _refuse_restarts_on_a_shared_store()
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {rank} wants GPU {local_rank} but {torch.cuda.device_count()} are "
                            f"visible; "
                            f"lower torchrun's --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return Distributed(dist.get_rank(), dist.get_world_size()), device


def _refuse_restarts_on_a_shared_store() -> None:
    """Stop before training when torchrun would restart the workers into a hang.

    By default (torch 2.5 and later, up to the 2.14 pinned here) torchrun's c10d rendezvous hands
    the workers its own store and keeps it across restarts, with the keys of the last attempt
    still in it: a restarted worker can read a dead worker's address, and Gloo or NCCL then waits
    for a connection that never comes, for the whole collective timeout (pytorch/pytorch#135712;
    seen here in tests/test_ddp.py's two-machine test). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    each attempt gets a store of its own.
    """
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise UserError(f"torchrun --max-restarts {restarts} can hang at its first restart (its rendezvous "
                        f"store keeps the last attempt's addresses): start torchrun with "
                        f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment, with --rdzv-backend c10d")


def leave(ddp: Distributed) -> None:
    if ddp.active:
        dist.destroy_process_group()


def launched() -> bool:
    """Whether this process is a worker of a torchrun (or elastic launcher) job."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch(nproc: int, device_setting: str, argv: list[str]) -> None:
    """Run `python argv` as `nproc` processes of one job on this machine and wait for them.

    torch's elastic launcher, set up as `torchrun --standalone --nproc_per_node nproc` sets it up
    (c10d rendezvous on a free loopback port), so that the pipeline's `cyclegan train` and a
    torchrun command line train the same run. No restarts: a worker's failure (bad params, a full
    disk) would only fail again; rerunning resumes from the last checkpoint.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    device = resolve_device(device_setting, "train.device")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"train.nproc_per_node is {nproc} but {torch.cuda.device_count()} GPUs are visible; "
                        f"lower it to at most {torch.cuda.device_count()}")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1",
                          max_restarts=0)
    try:
        elastic_launch(config, sys.executable)(*argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"exit code {failure.exitcode}"
        if failure.exitcode < 0:
            how = f"killed by {signal.Signals(-failure.exitcode).name}"
        raise UserError(f"training process {rank} of {nproc} stopped ({how}); its error is above. "
                        f"Run again to resume from the last checkpoint") from None
    except SignalException as e:
        raise UserError(f"stopped by {e.sigval.name}; its {nproc} training processes were stopped. Run again "
                        f"to resume from the last checkpoint") from None

