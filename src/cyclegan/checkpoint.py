"""Full-state training checkpoints: everything needed to resume a run bit for bit.

A checkpoint holds the four networks, both optimizers and schedulers, the epoch and the position
in it, the global step, the image pools and RNG states of every rank, the loss history, the
MLflow run id and a fingerprint of the config and data it belongs to. It holds only tensors and
plain Python values, so it loads with torch.load(weights_only=True): a checkpoint file cannot
run code.

Files are written atomically (a temp file renamed into place), so a run killed mid-write leaves
the previous checkpoints intact; `load_latest` also skips a newest file that does not load.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_path

PATTERN = re.compile(r"step_(\d{9})\.pt$")


def rng_state() -> dict[str, Any]:
    """The global RNGs of Python, NumPy and torch (CPU, and the current CUDA device if in use)."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        # Only this process's device: get_rng_state_all() would create a CUDA context on every
        # visible GPU, in every rank of a multi-GPU job.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(state: dict[str, Any], folder: Path, step: int, keep: int) -> Path:
    """Write step_<step>.pt atomically, then drop all but the newest `keep` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:09d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    # A run killed while writing leaves its temp file behind; ours has just been renamed, so
    # any left here is such a leftover (there is one writer: rank 0).
    for stale in folder.glob(".step_*.tmp"):
        stale.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.exists():
        return []
    return sorted(p for p in folder.iterdir() if PATTERN.search(p.name))


def load_latest(folder: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads; an unreadable one (a disk full mid-write) is skipped."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, with a note
            print(f"cyclegan train: skipping unreadable checkpoint {path}: {e}")
    return None


def clear(folder: Path) -> None:
    for path in list_checkpoints(folder):
        path.unlink()
