"""How one process runs CycleGAN: torch's process settings, the precision, the memory layout,
and the wrappers (DistributedDataParallel, torch.compile) around the networks the step calls.

The algorithm (cyclegan.model) knows none of this; the train stage and the benchmarks set it up
here, from the params, the same way.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import Config
from .device import use_bf16
from .distributed import Distributed
from .model import CycleGAN
from .networks import use_deterministic_padding


def configure_torch(cfg: Config, device: torch.device, rank: int) -> None:
    """Process-wide settings for training: threads, deterministic kernels or cuDNN autotuning, and
    the global RNG's seed."""
    t = cfg.train
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if t.threads:
        torch.set_num_threads(t.threads)
    elif local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Each process would take every core (torch's default): the cores are shared out instead,
        # as torchrun's OMP_NUM_THREADS=1 does on a machine with a core per process.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    if t.deterministic:
        # Deterministic mode costs GPU speed: cuDNN stops benchmarking convolution algorithms
        # and uses only its deterministic ones (often not the fastest), cuBLAS gets a fixed
        # workspace, and the ReflectionPad2d backward is replaced by a slower gather
        # (`DeterministicReflectionPad2d`). On CPU the kernels used here are deterministic
        # anyway: the flag changes nothing there.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # Strict: an op without a deterministic kernel stops the run with torch's error naming it,
        # rather than warning while the promise of repeatable runs silently breaks.
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # Each rank its own stream (dropout, WGAN-GP interpolation); rank 0's equals a single process's.
    torch.manual_seed(cfg.seed + rank)


def build_model(cfg: Config, device: torch.device, ddp: Distributed) -> CycleGAN:
    """CycleGAN as this process runs it: precision, memory layout and wrappers from the params."""
    t, cuda = cfg.train, device.type == "cuda"
    model = CycleGAN(cfg, device, rank=ddp.rank, bf16=use_bf16(t.precision, device, "train.precision"),
                     memory_format=torch.channels_last if t.channels_last else torch.contiguous_format)
    if cuda and t.deterministic:
        for net in model.nets.values():
            use_deterministic_padding(net)

    def wrap(net: nn.Module, synced: bool) -> nn.Module:
        if synced and ddp.active:
            # No buffer sync before each forward: the only buffers are BatchNorm running
            # statistics, used at test time; rank 0's are the ones saved either way, and
            # overwriting them before D's second forward of a step would modify tensors
            # that autograd saved in the first.
            net = DistributedDataParallel(net, device_ids=[device] if cuda else None,
                                          forward_sync_buffers=False)
        return torch.compile(net, dynamic=False) if t.compile else net

    model.wrap(wrap)
    return model
