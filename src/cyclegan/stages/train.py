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
the training samples are a pure function of (seed, epoch, position) (see cyclegan.prepared_data). On CPU a
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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import checkpoint, code_closure, generator_init, generator_mlflow, paths, tracking
from ..config import Config
from ..prepared_data import PositionSampler, PreparedDataset, UnpairedTrainSet, batch_to_device
from ..device import exact_fp32
from ..distributed import Distributed, join, launch, launched, leave
from ..errors import UserError
from ..fid_kid import fid_kid
from ..figures import sample_grid
from ..fileio import atomic_path, write_json
from ..generator_file import save_generator, translate_array
from ..generator_init import InitGenerator
from ..model import LOSS_TERMS, CycleGAN
from ..runtime import build_model, configure_torch
from ..training_state import load_process_state, load_shared_state, process_state, shared_state
from ..vocabulary import DIRECTIONS, PER_EPOCH, during_training, metric

LOSS_COLUMNS = ("step", "epoch", "lr", *(f"loss_{k}" for k in LOSS_TERMS))
EVAL_COLUMNS = ("epoch", *PER_EPOCH)


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
        for d in DIRECTIONS:
            grid = sample_grid(samples[d.name], model.nets[d.generator], model.nets[d.back], model.device)
            mlflow.log_image(grid, f"samples/{d.name}/epoch_{epoch:04d}.png")
            # Keyed and stepped too: MLflow's image charts line up one key's grids across runs
            # (a sweep's compare page) with a slider over the epochs; the file above is for browsing.
            mlflow.log_image(grid, key=tracking.sample_image_key(d.name), step=epoch)


def _fid_kid(model: CycleGAN, cfg: Config, test_A: np.ndarray, test_B: np.ndarray) -> dict[str, float]:
    """FID/KID of the test sets' translations, as the evaluate stage scores them."""
    out: dict[str, float] = {}
    real = {"testA": test_A, "testB": test_B}
    for d in DIRECTIONS:
        with model.inference(), exact_fp32():  # as the translate stage computes them
            fake = translate_array(model.nets[d.generator], real[d.source], cfg.eval.batch_size, model.device)
        scores = fid_kid(fake, real[d.target], cfg)
        for kind in ("fid", "kid"):
            out[metric(kind, d.name)] = scores[kind]
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


def _open_checkpoint(root: Path, fp: str, execution: dict[str, Any], fresh: bool, ddp: Distributed,
                     held: contextlib.ExitStack) -> dict[str, Any] | None:
    """Rank 0 locks the run for this process (`held` keeps the lock); the newest checkpoint of the
    run, wherever it is, is read and handed to every rank, or its one-line error is.

    Rank 0 alone writes checkpoints, on its own machine's disk: without a shared file system, a
    job started again may find its rank 0 on another machine (c10d rendezvous ranks machines by
    their address and process id), so every rank looks in its own checkpoint folder and the
    newest one found anywhere is the one resumed.
    """
    error = None
    folder = checkpoint.run_folder(root, fp)
    if ddp.main:
        try:
            held.enter_context(checkpoint.hold_run(folder))
        except UserError as e:
            error = str(e)
    error = ddp.broadcast(error)
    if error:
        raise UserError(error)
    if fresh and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        checkpoint.clear(folder)  # on every machine: a later restart must not find the old run's
    ddp.barrier()
    found = ddp.all_gather(checkpoint.newest_step(folder))
    source = max(range(ddp.world), key=lambda r: (found[r], -r))  # rank 0 where it has the newest
    opened: tuple[dict[str, Any] | None, str | None] = (None, None)
    if ddp.rank == source:
        try:
            opened = (checkpoint.open_run(root, fp, execution), None)
        except UserError as e:
            opened = (None, str(e))
    state, error = ddp.broadcast(opened, src=source)
    if error:
        raise UserError(error)
    return state


@dataclass
class Run:
    """What the phases of a training run share: set up (or resumed) once, then stepped."""

    cfg: Config
    ddp: Distributed
    device: torch.device
    data: PreparedDataset
    dataset: UnpairedTrainSet
    epoch_size: int
    model: CycleGAN
    initial: dict[str, InitGenerator]
    fingerprint: str
    folder: Path  # this run's checkpoints
    execution: dict[str, Any]
    guard: NonFiniteGuard
    total_steps: int
    progress: Progress = field(default_factory=Progress)
    history: list[dict[str, float]] = field(default_factory=list)       # a row per logged step
    eval_history: list[dict[str, float]] = field(default_factory=list)  # a row per evaluated epoch
    run_id: str | None = None
    images_seen: int = 0  # by this process's run, all ranks together (throughput)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.ddp.world

    @property
    def n_epochs(self) -> int:
        return self.cfg.train.n_epochs + self.cfg.train.n_epochs_decay

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.epoch_size / self.global_batch)

    @property
    def done(self) -> bool:
        return self.progress.epoch >= self.n_epochs or self.progress.step >= self.total_steps


def main(cfg: Config, args=None) -> None:
    fresh = bool(getattr(args, "fresh", False))
    nproc = cfg.train.nproc_per_node
    if nproc > 1 and not launched():
        launch(nproc, cfg.train.device, ["-m", "cyclegan", "--params", getattr(args, "params", "params.yaml"),
                                         "train", *(["--fresh"] if fresh else [])])
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if nproc > 1 and local_world != nproc:
        raise UserError(f"train.nproc_per_node is {nproc} but torchrun started {local_world} processes on "
                        f"this machine: set it to {local_world}, or to 1 and let torchrun's options decide")
    ddp, device = join(cfg.train.device)
    try:
        with contextlib.ExitStack() as held:  # the run's lock, from when train knows which run it is
            train(cfg, ddp, device, held, fresh)
    finally:
        leave(ddp)


def train(cfg: Config, ddp: Distributed, device: torch.device, held: contextlib.ExitStack,
          fresh: bool = False) -> None:
    run = _set_up(cfg, ddp, device, held, fresh)
    tracked = tracking.start_training_run(cfg, run.run_id) if ddp.main else contextlib.nullcontext()
    t_start = time.perf_counter()
    with tracked as mlflow:
        logged = _start_logging(run, mlflow)
        bar = tqdm(total=run.total_steps, initial=run.progress.step, desc="train", unit="step",
                   dynamic_ncols=True,
                   disable=None if ddp.main else True)
        while not run.done:
            _train_epoch(run, mlflow, logged, bar)
            if run.progress.position >= run.epoch_size:
                _end_epoch(run, mlflow, logged)
            _save_checkpoint(run)
        bar.close()
        _finish(run, mlflow, time.perf_counter() - t_start)
    ddp.barrier()


def _set_up(cfg: Config, ddp: Distributed, device: torch.device, held: contextlib.ExitStack,
            fresh: bool) -> Run:
    """The data, the model (from train.init_from, or the run's newest checkpoint) and the plan."""
    t = cfg.train
    data, dataset, epoch_size = _open_dataset(cfg, ddp)
    configure_torch(cfg, device, ddp.rank)
    model = build_model(cfg, device, ddp)
    initial = generator_init.load(cfg)
    for name, init in initial.items():  # every rank loads the same file: the ranks stay in step
        model.nets[name].load_state_dict(init.state_dict)
    fp = checkpoint.fingerprint(cfg, data.manifest.get("content_sha256", ""),
                                code_closure.sources_sha256("train"),
                                {name: init.sha256 for name, init in initial.items()}, ddp.world)
    checkpoints = paths.checkpoints_root()
    folder = checkpoint.run_folder(checkpoints, fp)
    execution = {"world": ddp.world, "device": device.type, "bf16": model.bf16,
                 "channels_last": model.memory_format == torch.channels_last,
                 "deterministic": t.deterministic, "compile": t.compile}
    run = Run(cfg, ddp, device, data, dataset, epoch_size, model, initial, fp, folder, execution,
              NonFiniteGuard(device, folder), total_steps=0)
    run.total_steps = run.steps_per_epoch * run.n_epochs
    if t.max_steps:
        run.total_steps = min(run.total_steps, t.max_steps)
    state = _open_checkpoint(checkpoints, fp, execution, fresh, ddp, held)
    if state is not None:
        load_shared_state(model, state["model"])
        load_process_state(model, state["ranks"][ddp.rank])
        run.progress = Progress(state["epoch"], state["position"], state["step"])
        run.history, run.eval_history = state["history"], state["eval_history"]
        run.run_id = state["mlflow_run_id"]
        del state  # the loaded copy of every tensor is no longer needed
    if ddp.main:
        _print_plan(run)
    return run


def _print_plan(run: Run) -> None:
    print(f"cyclegan train: {run.total_steps} steps ({run.n_epochs} epochs of {run.steps_per_epoch} steps, "
          f"global batch {run.global_batch}) on {run.ddp.world} x {run.device.type}, "
          f"{'bf16 autocast' if run.model.bf16 else 'fp32'}"
          + "".join(f", {name} from {init.path}" for name, init in run.initial.items()))
    if run.n_epochs == 0:
        untrained = [name for name in run.model.nets if name.startswith("G_") and name not in run.initial]
        if untrained:
            print(f"cyclegan train: 0 epochs; {' and '.join(untrained)} not in train.init_from: written "
                  f"with random weights, their scores mean nothing")


@dataclass
class Logged:
    """What the MLflow run already holds (a resumed run repeats steps since its last checkpoint)."""

    step: int = 0   # the last step with losses
    epoch: int = 0  # the last epoch with FID/KID
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # the test images of the sample grids


def _start_logging(run: Run, mlflow) -> Logged:
    cfg, data = run.cfg, run.data
    logged = Logged(samples={d.name: np.array(data.array(d.source)[:cfg.eval.n_samples]) for d in DIRECTIONS})
    if not run.ddp.main:
        return logged
    run.run_id = mlflow.active_run().info.run_id
    if run.initial:
        mlflow.set_tags({f"init_{name}_sha256": init.sha256 for name, init in run.initial.items()})
    tracking.log_dataset(mlflow, data.root.name, data.root, data.manifest,
                         {split: data.array(split).shape for split in ("trainA", "trainB", "testA", "testB")})
    # On CPU the repeated steps compute the same values; on GPU nearly the same.
    logged.step = tracking.last_logged_step(mlflow, "loss_G_A")
    logged.epoch = tracking.last_logged_step(mlflow, during_training(PER_EPOCH[0]))
    return logged


def _train_epoch(run: Run, mlflow, logged: Logged, bar: tqdm) -> None:
    """The steps of the epoch in progress, from its position, up to its end or the last step."""
    cfg, ddp, model, progress = run.cfg, run.ddp, run.model, run.progress
    t = cfg.train
    run.dataset.set_epoch(progress.epoch)
    loader = DataLoader(run.dataset, batch_size=t.batch_size,
                        sampler=PositionSampler(run.epoch_size, progress.position, ddp.rank, ddp.world),
                        num_workers=cfg.data.num_workers, pin_memory=run.device.type == "cuda",
                        # A private generator: the loader's seed draw must not consume the
                        # global RNG, or a resumed run would see different dropout noise.
                        generator=torch.Generator().manual_seed(cfg.seed))
    check_every_step = run.device.type == "cpu"
    window_start, window_images = time.perf_counter(), 0
    for real_A, real_B in loader:
        losses = model.train_step(batch_to_device(real_A, run.device, model.memory_format),
                                  batch_to_device(real_B, run.device, model.memory_format))
        progress.step += 1
        progress.position += ddp.world * real_A.shape[0]
        window_images += ddp.world * real_A.shape[0]
        run.images_seen += ddp.world * real_A.shape[0]
        run.guard.update(losses, progress.step)
        bar.update(1)
        log_now = progress.step % t.log_every == 0 or progress.step == run.total_steps
        if check_every_step or log_now:
            run.guard.check(ddp)
        if log_now:
            now = time.perf_counter()
            _log_losses(run, mlflow, logged, bar, losses, window_images / max(now - window_start, 1e-9))
            window_start, window_images = now, 0
        if progress.step % t.checkpoint_every == 0:
            _save_checkpoint(run)
        if progress.step >= run.total_steps:
            break


def _log_losses(run: Run, mlflow, logged: Logged, bar: tqdm, losses: dict[str, torch.Tensor],
                images_per_s: float) -> None:
    # Reading the losses waits for the GPU, hence only every log_every steps.
    # The global batch's loss: the mean of the ranks' batch means.
    values = run.ddp.mean(torch.stack([losses[k].float() for k in LOSS_TERMS]))
    values = dict(zip(LOSS_TERMS, values.tolist()))
    row = {"step": run.progress.step, "epoch": run.progress.epoch + 1, "lr": run.model.lr,
           **{f"loss_{k}": values[k] for k in LOSS_TERMS}}
    run.history.append(row)
    if run.ddp.main and run.progress.step > logged.step:
        mlflow.log_metrics({**{k: v for k, v in row.items() if k != "step"}, "images_per_s": images_per_s},
                           step=run.progress.step)
        bar.set_postfix(G_A=f"{values['G_A']:.3f}", cyc=f"{values['cycle_A']:.3f}")


def _end_epoch(run: Run, mlflow, logged: Logged) -> None:
    """The LR steps; rank 0 logs the sample grids and, every train.eval_every epochs, FID/KID."""
    progress, cfg = run.progress, run.cfg
    progress.epoch, progress.position = progress.epoch + 1, 0
    run.model.step_lr()
    if run.ddp.main:
        if cfg.eval.n_samples:
            _log_sample_grids(mlflow, run.model, logged.samples, progress.epoch)
        if cfg.train.eval_every and progress.epoch % cfg.train.eval_every == 0:
            test_A, test_B = np.array(run.data.array("testA")), np.array(run.data.array("testB"))
            scores = _fid_kid(run.model, cfg, test_A, test_B)
            run.eval_history.append({"epoch": progress.epoch, **scores})
            if progress.epoch > logged.epoch:
                mlflow.log_metrics({during_training(k): v for k, v in scores.items()}, step=progress.epoch)
    run.ddp.barrier()  # the other ranks wait while rank 0 evaluates


def _save_checkpoint(run: Run) -> None:
    run.guard.check(run.ddp)
    bad_net = run.model.non_finite_network()
    if bad_net:
        raise UserError(f"{bad_net} has NaN or inf weights after step {run.progress.step}; training stopped, "
                        f"no checkpoint written. Lower train.lr or check the data")
    ranks = run.ddp.gather(process_state(run.model))
    if run.ddp.main:
        progress = run.progress
        checkpoint.save({"model": shared_state(run.model), "ranks": ranks, "epoch": progress.epoch,
                         "position": progress.position, "step": progress.step, "history": run.history,
                         "eval_history": run.eval_history, "mlflow_run_id": run.run_id,
                         "fingerprint": run.fingerprint, "config": run.cfg.to_dict(),
                         "execution": run.execution},
                        run.folder, progress.step, run.cfg.train.keep_checkpoints)
        _write_csv(paths.TRAIN_LOSSES, run.history)


def _finish(run: Run, mlflow, elapsed: float) -> None:
    """The generators, the loss and FID/KID files, and (rank 0) their MLflow records."""
    run.guard.check(run.ddp)
    if not run.ddp.main:
        return
    cfg, model, data, progress = run.cfg, run.model, run.data, run.progress
    paths.MODELS.mkdir(exist_ok=True)
    for d in DIRECTIONS:
        save_generator(model.nets[d.generator], cfg.model, d.name, paths.GENERATORS[d.generator])
    _write_csv(paths.TRAIN_LOSSES, run.history, LOSS_COLUMNS)  # header only after 0 epochs (init_from)
    _write_csv(paths.TRAIN_EVAL, run.eval_history, EVAL_COLUMNS)
    last = run.history[-min(len(run.history), 5):]
    final = {f"loss_{k}": float(np.mean([r[f"loss_{k}"] for r in last])) for k in LOSS_TERMS} if last else {}
    write_json(paths.TRAIN_METRICS, final)
    timing = {"images_per_s_this_run": run.images_seen / elapsed if run.images_seen else 0.0,
              "train_seconds_this_run": elapsed}
    mlflow.log_metrics({**{f"final_{k}": v for k, v in final.items()}, **timing}, step=progress.step)
    mlflow.set_tags({"processes": run.ddp.world, "global_batch": run.global_batch,
                     "device_used": run.device.type})
    mlflow.log_artifact(str(paths.TRAIN_LOSSES))
    tracking.tag_generators(mlflow)
    # Each model's input example: the first test image of its source domain.
    generator_mlflow.log_generators(mlflow, cfg,
                                    {d.name: np.array(data.array(d.source)[:1]) for d in DIRECTIONS},
                                    progress.step)
    print(f"cyclegan train: {progress.step} steps, {run.images_seen} images in {elapsed:.0f} s this run "
          f"({timing['images_per_s_this_run']:.2f} images/s)")
