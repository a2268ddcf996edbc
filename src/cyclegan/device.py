"""Turn a device setting (auto, cpu, cuda) into a torch.device, shared by every stage."""
from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(setting: str, key: str) -> torch.device:
    """`auto` picks CUDA when visible; asking for CUDA without one is a one-line error naming `key`."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key} is 'cuda' but no CUDA device is visible; set {key}: auto or cpu")
    return torch.device(setting)
