"""`cyclegan train`: train CycleGAN on data/prepared/<name>, resuming from models/checkpoints.

Writes models/G_A.safetensors (A->B) and G_B.safetensors (B->A), metrics/train.json (the final
losses), the per-step loss plot metrics/train_losses.csv and the per-epoch FID/KID plot
metrics/train_eval.csv (train.eval_every); logs params, losses, LR, throughput, a sample grid per
epoch and the FID/KID to MLflow. What DVC hashes is a function of data, params and code alone:
throughput and wall time go to MLflow and the terminal only.

The algorithm is cyclegan.model.CycleGAN; this module is its driver: the device, precision
and wrappers, the loop over epochs (an epoch is max(|A|, |B|) samples, each A image with a random
B image), logging, checkpoints and outputs.

Resuming is exact: a checkpoint holds every piece of state the remaining steps depend on, and
the training samples are a pure function of (seed, epoch, position) (see cyclegan.data). On CPU a
run killed at any point and started again ends with the same losses and bit-identical weights
as an uninterrupted one (tests/test_resume.py).

Several processes: `torchrun --nproc_per_node N -m cyclegan train` (add --nnodes etc. for
several machines) trains with DistributedDataParallel, NCCL on GPUs, Gloo on CPUs. Each rank
takes every N-th position of the epoch, so the global batch is N * train.batch_size; rank 0
alone writes checkpoints, outputs and MLflow records.
"""
from __future__ import annotations

import contextlib
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import checkpoint, init_from, mlflow_models, paths, sources, tracking
from ..config import Config
from ..data import PositionSampler, PreparedDataset, UnpairedTrainSet, batch_to_device
from ..device import exact_fp32
from ..distributed import Distributed, join, leave
from ..errors import UserError
from ..fid_kid import fid_kid
from ..figures import sample_grid
from ..fileio import atomic_path, write_json
from ..generators import save_generator, translate_array
from ..model import LOSS_TERMS, CycleGAN
from ..runtime import build_model, configure_torch

LOSS_COLUMNS = ("step", "epoch", "lr", *(f"loss_{k}" for k in LOSS_TERMS))
EVAL_COLUMNS = ("epoch", "fid_A2B", "fid_B2A", "kid_A2B", "kid_B2A")


def add_arguments(parser) -> None:
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")


class NonFiniteGuard:
    """Remembers the first step whose losses were not all finite, and which terms were not.

    The bookkeeping stays on the device, so a GPU step needs no host sync; `check` reads it (one
    sync) and is called every step on CPU, where that costs nothing, and at log steps and before
    every checkpoint or model write on GPU. Either way the error names the exact step.
    """

    NEVER = torch.iinfo(torch.int64).max

    def __init__(self, device: torch.device, checkpoints: Path):
        self.checkpoints = checkpoints
        self.first = torch.full((), self.NEVER, dtype=torch.int64, device=device)
        self.values = torch.zeros(len(LOSS_TERMS), device=device)

    def update(self, losses: dict[str, torch.Tensor], step: int) -> None:
        values = torch.stack([losses[k].float() for k in LOSS_TERMS])
        new = (self.first == self.NEVER) & ~values.isfinite().all()
        self.first = torch.where(new, step, self.first)
        self.values = torch.where(new, values, self.values)

    def check(self, ddp: Distributed) -> None:
        first = ddp.reduce(self.first.clone(), "min")  # every rank stops, at the earliest bad step of any
        step = int(first)
        if step == self.NEVER:
            return
        values = torch.where(self.first == first, self.values, torch.zeros_like(self.values))
        if ddp.active:
            bad = ddp.reduce((~values.isfinite()).to(torch.int32), "max")
            values = torch.where(bad.bool(), torch.nan, values)
        bad_terms = [f"loss_{k} is {v}" for k, v in zip(LOSS_TERMS, values.tolist()) if not math.isfinite(v)]
        kept = checkpoint.list_checkpoints(self.checkpoints)
        kept_note = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was written"
        raise UserError(f"{', '.join(bad_terms)} at step {step}; training stopped, {kept_note}. "
                        f"Lower train.lr or check the data")


# --- outputs --------------------------------------------------------------------------------------

def _log_sample_grids(mlflow, model: CycleGAN, samples: dict[str, np.ndarray], epoch: int) -> None:
    with model.inference(), exact_fp32():
        for direction, (forward, backward) in (("A2B", ("G_A", "G_B")), ("B2A", ("G_B", "G_A"))):
            grid = sample_grid(samples[direction], model.nets[forward], model.nets[backward], model.device)
            mlflow.log_image(grid, f"samples/{direction}/epoch_{epoch:04d}.png")
            # Keyed and stepped too: MLflow's image charts line up one key's grids across runs
            # (a sweep's compare page) with a slider over the epochs; the file above is for browsing.
            mlflow.log_image(grid, key=tracking.sample_image_key(direction), step=epoch)


def _fid_kid(model: CycleGAN, cfg: Config, test_A: np.ndarray, test_B: np.ndarray) -> dict[str, float]:
    """FID/KID of the test sets' translations, as the evaluate stage scores them."""
    out: dict[str, float] = {}
    for direction, G, source, reference in (("A2B", "G_A", test_A, test_B), ("B2A", "G_B", test_B, test_A)):
        with model.inference(), exact_fp32():  # as the translate stage computes them
            fake = translate_array(model.nets[G], source, cfg.eval.batch_size, model.device)
        scores = fid_kid(fake, reference, cfg)
        out[f"fid_{direction}"] = scores["fid"]
        out[f"kid_{direction}"] = scores["kid"]
    return out


def _write_csv(path: Path, rows: list[dict[str, float]], columns: tuple[str, ...] | None = None) -> None:
    """Rows as CSV; with `columns`, a header-only file when there are no rows (DVC needs the file)."""
    if not rows and columns is None:
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns or rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# --- the stage ---------------------------------------------------------------------------------

@dataclass
class Progress:
    epoch: int = 0     # 0-based epoch in progress
    position: int = 0  # samples of this epoch consumed, by all ranks together
    step: int = 0      # optimisation steps done


def _open_dataset(cfg: Config, ddp: Distributed) -> tuple[PreparedDataset, UnpairedTrainSet, int]:
    """The prepared data, the training set, and the samples per epoch; all params checked here."""
    t = cfg.train
    data = PreparedDataset.of(cfg.data.dataset, ("trainA", "trainB", "testA", "testB"))
    train_A, train_B = data.array("trainA"), data.array("trainB")
    if min(train_A.shape[1:3]) < cfg.data.crop_size or min(train_B.shape[1:3]) < cfg.data.crop_size:
        raise UserError(f"data.crop_size ({cfg.data.crop_size}) exceeds the prepared images "
                        f"({train_A.shape[1]} px); run `dvc repro prepare`")
    dataset = UnpairedTrainSet(train_A, train_B, cfg.data.crop_size, not cfg.data.no_flip, cfg.seed)
    # Every rank must run as many steps as the others, or those with more would wait forever at
    # the gradient all-reduce: an epoch drops its last len % world positions, a different few
    # images each epoch since the order changes (DistributedSampler's drop_last, in effect).
    epoch_size = len(dataset) - len(dataset) % ddp.world
    if t.batch_size * ddp.world > epoch_size:
        procs = f" x {ddp.world} processes" if ddp.active else ""
        raise UserError(f"train.batch_size ({t.batch_size}{procs}) exceeds the dataset ({len(dataset)} "
                        f"images per epoch); lower train.batch_size")
    n_test = min(len(data.array("testA")), len(data.array("testB")))
    if t.eval_every and n_test < 2:
        raise UserError(f"train.eval_every needs at least 2 test images per domain for KID, the prepared "
                        f"data has {n_test}; set train.eval_every: 0")
    return data, dataset, epoch_size


def _open_checkpoint(fp: str, execution: dict[str, Any], fresh: bool, ddp: Distributed) -> dict[str, Any] | None:
    """Rank 0 reads the run's newest checkpoint and hands it, or its one-line error, to every rank."""
    found: tuple[dict[str, Any] | None, str | None] = (None, None)
    if ddp.main:
        try:
            found = (checkpoint.open_run(paths.CHECKPOINTS, fp, execution, fresh), None)
        except UserError as e:
            found = (None, str(e))
    state, error = ddp.broadcast(found)
    if error:
        raise UserError(error)
    return state


def main(cfg: Config, args=None) -> None:
    ddp, device = join(cfg.train.device)
    try:
        train(cfg, ddp, device, fresh=bool(getattr(args, "fresh", False)))
    finally:
        leave(ddp)


def train(cfg: Config, ddp: Distributed, device: torch.device, fresh: bool = False) -> None:
    t = cfg.train
    data, dataset, epoch_size = _open_dataset(cfg, ddp)
    configure_torch(cfg, device, ddp.rank)
    global_batch = t.batch_size * ddp.world
    steps_per_epoch = math.ceil(epoch_size / global_batch)
    n_epochs_total = t.n_epochs + t.n_epochs_decay
    total_steps = steps_per_epoch * n_epochs_total
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)

    model = build_model(cfg, device, ddp)
    initial = init_from.load(cfg)
    for name, init in initial.items():  # every rank loads the same file: the ranks stay in step
        model.nets[name].load_state_dict(init.state_dict)
    fp = checkpoint.fingerprint(cfg, data.manifest.get("content_sha256", ""), sources.sources_sha256("train"),
                                {name: init.sha256 for name, init in initial.items()})
    run_dir = checkpoint.run_folder(paths.CHECKPOINTS, fp)
    execution = {"world": ddp.world, "device": device.type, "bf16": model.bf16,
                 "channels_last": model.memory_format == torch.channels_last,
                 "deterministic": t.deterministic, "compile": t.compile}
    state = _open_checkpoint(fp, execution, fresh, ddp)
    progress, history, eval_history, run_id = Progress(), [], [], None
    if state is not None:
        model.load_state_dict(state["model"])
        model.load_rank_state(state["ranks"][ddp.rank])
        progress = Progress(state["epoch"], state["position"], state["step"])
        history, eval_history, run_id = state["history"], state["eval_history"], state["mlflow_run_id"]
        del state  # the loaded copy of every tensor is no longer needed
    if ddp.main:
        print(f"cyclegan train: {total_steps} steps ({n_epochs_total} epochs of {steps_per_epoch} steps, "
              f"global batch {global_batch}) on {ddp.world} x {device.type}, "
              f"{'bf16 autocast' if model.bf16 else 'fp32'}"
              + "".join(f", {name} from {init.path}" for name, init in initial.items()))
        if n_epochs_total == 0:
            untrained = [name for name in model.nets if name.startswith("G_") and name not in initial]
            if untrained:
                print(f"cyclegan train: 0 epochs; {' and '.join(untrained)} not in train.init_from: written "
                      f"with random weights, their scores mean nothing")

    samples = {"A2B": np.array(data.array("testA")[:cfg.eval.n_samples]),
               "B2A": np.array(data.array("testB")[:cfg.eval.n_samples])}
    guard = NonFiniteGuard(device, run_dir)
    check_every_step = device.type == "cpu"

    def save_checkpoint() -> None:
        guard.check(ddp)
        bad_net = model.non_finite_network()
        if bad_net:
            raise UserError(f"{bad_net} has NaN or inf weights after step {progress.step}; training stopped, "
                            f"no checkpoint written. Lower train.lr or check the data")
        ranks = ddp.gather(model.rank_state())
        if ddp.main:
            checkpoint.save({"model": model.state_dict(), "ranks": ranks, "epoch": progress.epoch,
                             "position": progress.position, "step": progress.step, "history": history,
                             "eval_history": eval_history, "mlflow_run_id": run_id, "fingerprint": fp, "config": cfg.to_dict(),
                             "execution": execution},
                            run_dir, progress.step, t.keep_checkpoints)
            _write_csv(paths.TRAIN_LOSSES, history)

    run = tracking.start_training_run(cfg, run_id) if ddp.main else contextlib.nullcontext()
    t_start, images_seen = time.perf_counter(), 0
    with run as mlflow:
        logged_step = logged_epoch = 0
        if ddp.main:
            run_id = mlflow.active_run().info.run_id
            if initial:
                mlflow.set_tags({f"init_{name}_sha256": init.sha256 for name, init in initial.items()})
            tracking.log_dataset(mlflow, data.root.name, data.root, data.manifest,
                                 {split: data.array(split).shape for split in ("trainA", "trainB", "testA", "testB")})
            # On CPU the repeated steps compute the same values; on GPU nearly the same.
            logged_step = tracking.last_logged_step(mlflow, "loss_G_A")
            logged_epoch = tracking.last_logged_step(mlflow, "train_fid_A2B")
        bar = tqdm(total=total_steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None if ddp.main else True)
        while progress.epoch < n_epochs_total and progress.step < total_steps:
            dataset.set_epoch(progress.epoch)
            loader = DataLoader(dataset, batch_size=t.batch_size,
                                sampler=PositionSampler(epoch_size, progress.position, ddp.rank, ddp.world),
                                num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                                # A private generator: the loader's seed draw must not consume the
                                # global RNG, or a resumed run would see different dropout noise.
                                generator=torch.Generator().manual_seed(cfg.seed))
            window_start, window_images = time.perf_counter(), 0
            for real_A, real_B in loader:
                losses = model.train_step(batch_to_device(real_A, device, model.memory_format),
                                          batch_to_device(real_B, device, model.memory_format))
                progress.step += 1
                progress.position += ddp.world * real_A.shape[0]
                window_images += ddp.world * real_A.shape[0]
                images_seen += ddp.world * real_A.shape[0]
                guard.update(losses, progress.step)
                bar.update(1)
                log_now = progress.step % t.log_every == 0 or progress.step == total_steps
                if check_every_step or log_now:
                    guard.check(ddp)
                if log_now:
                    # Reading the losses waits for the GPU, hence only every log_every steps.
                    # The global batch's loss: the mean of the ranks' batch means.
                    values = ddp.mean(torch.stack([losses[k].float() for k in LOSS_TERMS]))
                    values = dict(zip(LOSS_TERMS, values.tolist()))
                    now = time.perf_counter()
                    row = {"step": progress.step, "epoch": progress.epoch + 1, "lr": model.lr,
                           **{f"loss_{k}": values[k] for k in LOSS_TERMS}}
                    history.append(row)
                    if ddp.main and progress.step > logged_step:
                        mlflow.log_metrics({**{k: v for k, v in row.items() if k != "step"},
                                            "images_per_s": window_images / max(now - window_start, 1e-9)},
                                           step=progress.step)
                        bar.set_postfix(G_A=f"{values['G_A']:.3f}", cyc=f"{values['cycle_A']:.3f}")
                    window_start, window_images = now, 0
                if progress.step % t.checkpoint_every == 0:
                    save_checkpoint()
                if progress.step >= total_steps:
                    break
            if progress.position >= epoch_size:
                progress.epoch, progress.position = progress.epoch + 1, 0
                model.step_lr()
                if ddp.main:
                    if cfg.eval.n_samples:
                        _log_sample_grids(mlflow, model, samples, progress.epoch)
                    if t.eval_every and progress.epoch % t.eval_every == 0:
                        test_A, test_B = np.array(data.array("testA")), np.array(data.array("testB"))
                        scores = _fid_kid(model, cfg, test_A, test_B)
                        eval_history.append({"epoch": progress.epoch, **scores})
                        if progress.epoch > logged_epoch:
                            mlflow.log_metrics({f"train_{k}": v for k, v in scores.items()}, step=progress.epoch)
                ddp.barrier()  # the other ranks wait while rank 0 evaluates
            save_checkpoint()
        bar.close()

        guard.check(ddp)
        if ddp.main:
            paths.MODELS.mkdir(exist_ok=True)
            save_generator(model.nets["G_A"], cfg.model, "A2B", paths.GENERATORS["G_A"])
            save_generator(model.nets["G_B"], cfg.model, "B2A", paths.GENERATORS["G_B"])
            _write_csv(paths.TRAIN_LOSSES, history, LOSS_COLUMNS)  # header only after 0 epochs (init_from)
            _write_csv(paths.TRAIN_EVAL, eval_history, EVAL_COLUMNS)
            last = history[-min(len(history), 5):]
            final = {f"loss_{k}": float(np.mean([r[f"loss_{k}"] for r in last])) for k in LOSS_TERMS} if last else {}
            write_json(paths.TRAIN_METRICS, final)
            elapsed = time.perf_counter() - t_start
            timing = {"images_per_s_this_run": images_seen / elapsed if images_seen else 0.0,
                      "train_seconds_this_run": elapsed}
            mlflow.log_metrics({**{f"final_{k}": v for k, v in final.items()}, **timing}, step=progress.step)
            mlflow.set_tags({"processes": ddp.world, "global_batch": global_batch, "device_used": device.type})
            mlflow.log_artifact(str(paths.TRAIN_LOSSES))
            tracking.tag_generators(mlflow)
            # Each model's input example: the first test image of its source domain.
            mlflow_models.log_generators(mlflow, cfg, {"A2B": np.array(data.array("testA")[:1]),
                                                       "B2A": np.array(data.array("testB")[:1])}, progress.step)
            print(f"cyclegan train: {progress.step} steps, {images_seen} images in {elapsed:.0f} s this run "
                  f"({timing['images_per_s_this_run']:.2f} images/s)")
    ddp.barrier()
