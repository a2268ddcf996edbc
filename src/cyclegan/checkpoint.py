"""Full-state training checkpoints: everything needed to resume a run bit for bit.

A checkpoint holds the four networks, both optimizers and schedulers, the epoch and the position
in it, the global step, the image pools and RNG states of every rank, the loss history, the
MLflow run id and a fingerprint of the config and data it belongs to. It holds only tensors and
plain Python values, so it loads with torch.load(weights_only=True): a checkpoint file cannot
run code.

Files are written atomically (a temp file renamed into place), so a run killed mid-write leaves
the previous checkpoints intact; `load_latest` also skips a newest file that does not load.

Each run keeps its checkpoints in a folder of its own, models/checkpoints/<fingerprint>/, named by
what defines the result (`fingerprint`: the params, the data and the training code). A run of
other params starts in its own folder and leaves the others as they are; nothing is deleted but by
`--fresh`, which clears this run's folder. How the run executes (precision, memory layout,
deterministic kernels, device) may change between a run and its resumption; the number of
processes may not, since each process's image pools and RNG streams are part of the state: it is
in the fingerprint, so another number is another run.

One process at a time trains a run: `hold_run` locks its folder for as long as training lasts, so
a second process with the same fingerprint (an experiment queued twice, a re-queued one whose
first attempt still runs) stops with one line instead of interleaving checkpoints with the first.
The lock is the kernel's (flock on <fingerprint>.lock): it goes with the process, however it dies.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config
from .errors import UserError
from .fileio import atomic_path

PATTERN = re.compile(r"step_(\d{9})\.pt$")
# Params that define what is trained are in the fingerprint; these (logging, checkpoint cadence,
# where it runs, how its processes are started (their number is in it), and options that change
# the rounding but not the arithmetic) may change between a run and its resumption. The
# precision setting is in the fingerprint: bf16 is other arithmetic, and `dvc exp run -S
# train.precision=bf16` asks for a model trained so; but `auto`, whatever it resolves to on the
# machine at hand, resumes `auto`.
NON_SEMANTIC_TRAIN_PARAMS = ("device", "threads", "nproc_per_node", "log_every", "checkpoint_every",
                             "keep_checkpoints", "eval_every", "max_steps", "compile", "channels_last",
                             "deterministic")


def fingerprint(cfg: Config, data_hash: str, code_hash: str,
                init_hashes: dict[str, str] | None = None, world: int = 1) -> str:
    """The run a checkpoint belongs to: every param that defines what is trained, the data, and
    the code that trains it (cyclegan.code_closure: a change there makes DVC rerun the stage, and a
    resumed run would mix two versions of the algorithm), and the content (sha256) of the
    generators it starts from, `init_hashes` (train.init_from; their paths are not in it: the same
    weights under another name are the same run).

    The number of training processes, `world`, is in it: the global batch is world x batch_size.
    Not how they were started (train.nproc_per_node, or torchrun on one or several machines).

    Not how it executes: the device, channels_last, compile or deterministic kernels round
    differently but train the same model, so a run may resume under other settings; so may
    `precision: auto` on a GPU (bf16) after a CPU start (fp32).
    """
    train = {k: v for k, v in asdict(cfg.train).items() if k not in (*NON_SEMANTIC_TRAIN_PARAMS, "init_from")}
    key = {"lambda_cycle": cfg.lambda_cycle, "lambda_identity": cfg.lambda_identity, "seed": cfg.seed,
           "model": asdict(cfg.model), "train": train, "crop": cfg.data.crop_size,
           "no_flip": cfg.data.no_flip, "data": data_hash, "code": code_hash}
    if init_hashes:  # absent from scratch, so such runs keep the key they had before init_from
        key["init"] = init_hashes
    if world > 1:  # likewise absent for one process
        key["world"] = world
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
    # Through a Python file: a full disk then raises OSError (one line, cli) where torch's own
    # writer raises a RuntimeError ("unexpected pos").
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
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


def newest_step(folder: Path) -> int:
    """The step of the newest checkpoint in `folder`; -1 when there is none."""
    files = list_checkpoints(folder)
    return int(PATTERN.search(files[-1].name).group(1)) if files else -1


def clear(folder: Path) -> None:
    for path in list_checkpoints(folder):
        path.unlink(missing_ok=True)  # each machine's first process clears the folder; it may be shared


def run_folder(root: Path, fingerprint: str) -> Path:
    return root / fingerprint


def lock_path(folder: Path) -> Path:
    """<fingerprint>.lock beside the run's folder: the folder holds checkpoints alone."""
    return folder.parent / f"{folder.name}.lock"


@contextmanager
def hold_run(folder: Path) -> Iterator[None]:
    """Train the run in `folder` alone while this is held, or stop with one line naming who trains it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(folder), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"{folder} is being trained by {holder}: this run has the same params, data and "
                            f"code. Wait for it to finish (run again then and this one resumes from its "
                            f"checkpoints), or stop it first") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)  # the next holder writes its own name; a stale one must not linger


def open_run(root: Path, fingerprint: str, execution: dict[str, Any]) -> dict[str, Any] | None:
    """The newest checkpoint of this run (root/<fingerprint>), or None to start afresh.

    `execution` says how this process runs (world, device, bf16, ...); it is saved with each
    checkpoint. A different number of processes stops here with one line (the number is in the
    fingerprint; checkpoints of earlier versions lack it): the state holds one pool and RNG
    stream per process. Other differences are resumed, and named.
    """
    folder = run_folder(root, fingerprint)
    loaded = load_latest(folder)
    if loaded is None:
        _note_other_runs(root, folder)
        return None
    state, path = loaded
    before = state["execution"]
    if before["world"] != execution["world"]:
        raise UserError(f"{path} was written by {before['world']} training processes, this run has "
                        f"{execution['world']}: resume it with {before['world']} (torchrun "
                        f"--nproc_per_node), "
                        f"or start over with `cyclegan train --fresh`, which deletes this run's checkpoints")
    changed = [f"{k} {before[k]} -> {v}" for k, v in execution.items() if k in before and before[k] != v]
    print(f"cyclegan train: resuming from {path} (epoch {state['epoch'] + 1}, step {state['step']})"
          + (f", now with {', '.join(changed)}" if changed else ""))
    return state


def _note_other_runs(root: Path, folder: Path) -> None:
    """Say what else `root` holds: a new run never deletes another's training state."""
    subfolders = [d for d in root.iterdir() if d.is_dir() and d != folder] if root.is_dir() else []
    others = [files for files in map(list_checkpoints, subfolders) if files]
    legacy = list_checkpoints(root)  # the flat layout of earlier versions
    if not others and not legacy:
        return
    size = sum(f.stat().st_size for files in [*others, legacy] for f in files)
    parts = [f"{len(others)} other run{'s' * (len(others) != 1)}"] if others else []
    parts += ["checkpoints of an earlier version"] if legacy else []
    what = " and ".join(parts)
    print(f"cyclegan train: starting afresh in {folder}; {root} also holds {what} ({size / 2**20:.0f} MiB), "
          f"kept: delete what you no longer need")
