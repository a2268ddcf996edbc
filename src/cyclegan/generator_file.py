"""Generator files (models/G_A.safetensors, G_B.safetensors) and running a generator over images.

A generator file is all `cyclegan translate` needs: the weights as safetensors (no pickle, so
loading runs no code) and, in its metadata, the architecture (the model params) and the direction.
The same weights give the same bytes: safetensors orders tensors by name, and the metadata is one
JSON string with sorted keys (safetensors writes a metadata map in random order, so the file
holds a single entry). dvc.lock's hash of a generator is then a function of the training alone.

Files of cyclegan <= 0.1 (models/G_A.pt: torch.save of {"model", "direction", "state_dict"}) are
still read, with a one-line note.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from .config import ModelConfig
from .image_tensors import to_tensor, to_uint8
from .errors import UserError
from .fileio import atomic_path
from .networks import build_generator

FORMAT = "cyclegan-generator"
VERSION = 1
METADATA_KEY = "cyclegan"


def generator_bytes(net: nn.Module, model: ModelConfig, direction: str) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    header = {"format": FORMAT, "version": VERSION, "model": asdict(model), "direction": direction}
    return safetensors.torch.save(state, metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})


def save_generator(net: nn.Module, model: ModelConfig, direction: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(generator_bytes(net, model, direction))


def read_generator(path: Path, weights: bool = True) -> tuple[ModelConfig, str, dict[str, torch.Tensor]]:
    """(architecture, direction, state dict) of a generator file; a one-line error for anything else.

    weights=False reads the header alone (the state dict is then empty): the tensors are not read.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: generator not found; run `dvc repro train` first")
    if path.suffix == ".pt":
        return _read_legacy(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header: dict[str, Any] = json.loads((f.metadata() or {})[METADATA_KEY])
            state = {k: f.get_tensor(k) for k in f.keys()} if weights else {}
        if header.get("format") != FORMAT:
            raise ValueError(header.get("format"))
        if header.get("version", 0) > VERSION:
            raise UserError(f"{path}: generator file version {header['version']} is newer than this "
                            f"cyclegan reads ({VERSION}); upgrade cyclegan")
        return _model_config(header["model"]), header["direction"], state
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UserError(f"{path}: not a cyclegan generator file ({type(e).__name__}); "
                        f"retrain with `dvc repro train`") from None


def _model_config(saved: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def _read_legacy(path: Path) -> tuple[ModelConfig, str, dict[str, torch.Tensor]]:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        result = _model_config(saved["model"]), saved["direction"], saved["state_dict"]
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a cyclegan generator file ({type(e).__name__}); "
                        f"retrain with `dvc repro train`") from None
    print(f"note: {path} is a .pt generator of cyclegan <= 0.1, still read; `dvc repro train` writes "
          f"{path.with_suffix('.safetensors').name}", file=sys.stderr)
    return result


def load_generator(path: Path, device: torch.device) -> nn.Module:
    """The generator of a file, in eval mode on `device`; a one-line error for anything else."""
    return open_generator(path, device)[2]


def open_generator(path: Path, device: torch.device) -> tuple[ModelConfig, str, nn.Module]:
    """(architecture, direction, generator in eval mode on `device`) of a file, read once."""
    model, direction, state = read_generator(path)
    try:
        net = build_generator(model)
        net.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: weights do not fit the architecture in the file ({type(e).__name__}); "
                        f"retrain with `dvc repro train`") from None
    return model, direction, net.to(device).eval()


@torch.no_grad()
def translate_array(net: nn.Module, images: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, H, W, 3) through `net`, in batches."""
    out = []
    for i in range(0, len(images), batch_size):
        out.append(to_uint8(net(to_tensor(images[i:i + batch_size]).to(device))))
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:]), np.uint8)
