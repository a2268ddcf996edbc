"""Generator files (models/G_A.pt, G_B.pt) and running a generator over images.

A generator file holds its architecture (the model params) beside the weights, so a file is all
`cyclegan translate` needs: {"model": ModelConfig as a dict, "direction": "A2B" | "B2A",
"state_dict": ...}, tensors and plain values only, read with torch.load(weights_only=True).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .data import to_tensor, to_uint8
from .errors import UserError
from .fileio import atomic_path
from .networks import build_generator


def save_generator(net: nn.Module, model: ModelConfig, direction: str, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": asdict(model), "direction": direction, "state_dict": state}, tmp)


def load_generator(path: Path, device: torch.device) -> nn.Module:
    """The generator of a file, in eval mode on `device`; a one-line error for anything else."""
    if not path.exists():
        raise UserError(f"{path}: generator not found; run `dvc repro train` first")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net = build_generator(ModelConfig(**saved["model"]))
        net.load_state_dict(saved["state_dict"])
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UserError(f"{path}: not a cyclegan generator file ({type(e).__name__}); "
                        f"retrain with `dvc repro train`") from None
    return net.to(device).eval()


@torch.no_grad()
def translate_array(net: nn.Module, images: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, H, W, 3) through `net`, in batches."""
    out = []
    for i in range(0, len(images), batch_size):
        out.append(to_uint8(net(to_tensor(images[i:i + batch_size]).to(device))))
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:]), np.uint8)
