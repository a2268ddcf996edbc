"""Full-state training checkpoints: everything needed to resume a run bit for bit.

A checkpoint holds the four networks, both optimizers and schedulers, the epoch and the position
in it, the global step, the image pools and RNG states of every rank, the loss history, the
MLflow run id and a fingerprint of the config and data it belongs to. It holds only tensors and
plain Python values, so it loads with torch.load(weights_only=True): a checkpoint file cannot
run code.

Files are written atomically (a temp file renamed into place), so a run killed mid-write leaves
the previous checkpoints intact; `load_latest` also skips a newest file that does not load.

A checkpoint is resumed only by a run that computes the same thing: `fingerprint` names what
must match, `load_matching` applies it.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config
from .fileio import atomic_path

PATTERN = re.compile(r"step_(\d{9})\.pt$")
# Params that change what is computed are in the fingerprint; these (logging, checkpoint cadence,
# where and how fast it runs) may change between a run and its resumption.
NON_SEMANTIC_TRAIN_PARAMS = ("device", "threads", "log_every", "checkpoint_every", "keep_checkpoints",
                             "eval_every", "max_steps", "compile", "precision")


def fingerprint(cfg: Config, data_hash: str, world: int = 1, bf16: bool = False) -> str:
    """What a checkpoint must match to be resumed: every param that changes the computation.

    The number of processes is part of it: it sets the global batch and which rank draws which
    sample. So is the precision actually used, not its setting: `auto` and `fp32` compute the
    same on CPU.
    """
    train = {k: v for k, v in asdict(cfg.train).items() if k not in NON_SEMANTIC_TRAIN_PARAMS}
    key = {"lambda_cycle": cfg.lambda_cycle, "lambda_identity": cfg.lambda_identity, "seed": cfg.seed,
           "model": asdict(cfg.model), "train": train, "crop": cfg.data.crop_size,
           "no_flip": cfg.data.no_flip, "data": data_hash, "world": world, "bf16": bf16}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


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


def load_matching(folder: Path, fingerprint: str, fresh: bool) -> dict[str, Any] | None:
    """The newest checkpoint of `folder` if it belongs to `fingerprint`, else None.

    `fresh`, or checkpoints of other params or data, clear the folder first.
    """
    if fresh:
        clear(folder)
    loaded = load_latest(folder)
    if loaded is None:
        return None
    state, path = loaded
    if state.get("fingerprint") != fingerprint:
        print(f"cyclegan train: the checkpoints in {folder} belong to other params or data; starting afresh")
        clear(folder)
        return None
    print(f"cyclegan train: resuming from {path} (epoch {state['epoch'] + 1}, step {state['step']})")
    return state
