"""A CycleGAN's state for a checkpoint, and putting it back: what a resumed run continues from.

Two parts, because several processes train one model (DDP): `shared_state`, the same on every
process (the networks, optimizers and schedulers), and `process_state`, each process's own (its
image pools and RNG streams). cyclegan.checkpoint writes and finds the files; the algorithm they
belong to is cyclegan.model.
"""
from __future__ import annotations

from typing import Any

import torch

from . import checkpoint
from .model import CycleGAN


def shared_state(model: CycleGAN) -> dict[str, Any]:
    """What all processes share: the networks, optimizers and schedulers."""
    return {
        "nets": {k: v.state_dict() for k, v in model.nets.items()},
        "opt_G": model.opt_G.state_dict(), "opt_D": model.opt_D.state_dict(),
        "sched_G": model.sched_G.state_dict(), "sched_D": model.sched_D.state_dict(),
    }


def load_shared_state(model: CycleGAN, state: dict[str, Any]) -> None:
    for k, net in model.nets.items():
        net.load_state_dict(state["nets"][k])
    model.opt_G.load_state_dict(state["opt_G"])
    model.opt_D.load_state_dict(state["opt_D"])
    for opt in (model.opt_G, model.opt_D):
        _give_states_their_parameters_layout(opt)
    model.sched_G.load_state_dict(state["sched_G"])
    model.sched_D.load_state_dict(state["sched_D"])


def process_state(model: CycleGAN) -> dict[str, Any]:
    """What each process has of its own: its image pools and RNG states."""
    return {"pool_A": model.pool_A.state_dict(), "pool_B": model.pool_B.state_dict(),
            "rng": checkpoint.rng_state()}


def load_process_state(model: CycleGAN, state: dict[str, Any]) -> None:
    for pool, key in ((model.pool_A, "pool_A"), (model.pool_B, "pool_B")):
        pool.load_state_dict(state[key], model.device)
        pool.images = [img.contiguous(memory_format=model.memory_format) for img in pool.images]
    checkpoint.set_rng_state(state["rng"])


def _give_states_their_parameters_layout(opt: torch.optim.Optimizer) -> None:
    """Adam's moments in the memory layout of their parameter.

    load_state_dict keeps the saved strides: moments saved channels_last (as on CUDA) and loaded
    for contiguous weights (as on CPU), or the reverse, make the fused kernel pair up the wrong
    elements (CPU, silently) or refuse the layout (CUDA).
    """
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
