"""`cyclegan train`: train CycleGAN on data/prepared/<name>, resuming from models/checkpoints.

Writes models/G_A.pt (A->B) and models/G_B.pt (B->A), metrics/train.json, the per-step loss
plot metrics/train_losses.csv, and logs params, losses and sample grids to MLflow.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import checkpoint, paths, tracking
from ..config import Config
from ..data import PositionSampler, PreparedDataset, UnpairedTrainSet, dataset_name, to_tensor
from ..errors import UserError
from ..fileio import atomic_path, write_json
from ..losses import GANLoss, ImagePool, gradient_penalty
from ..models import build_networks

LOSS_TERMS = ("D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B")
# Params that change what is computed; others (logging, checkpoint cadence) may change on resume.
_NON_SEMANTIC = ("device", "threads", "log_every", "checkpoint_every", "keep_checkpoints",
                 "eval_every", "max_steps", "compile")


def add_arguments(parser) -> None:
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is visible; set train.device: auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def lr_factor(epoch: int, n_epochs: int, n_epochs_decay: int) -> float:
    """The authors' linear rule for 0-based epoch `epoch`: constant for n_epochs, then linear to 0.

    This is their lambda_rule with epoch_count=1, stepped at the end of each epoch, so epoch
    n_epochs + n_epochs_decay (1-based) trains at 1/(n_epochs_decay+1) of the initial rate; the
    2023 version of their loop steps at the start of the epoch instead and trains its last
    epoch at rate 0.
    """
    return 1.0 - max(0, epoch + 1 - n_epochs) / float(n_epochs_decay + 1)


def fingerprint(cfg: Config, data_hash: str) -> str:
    """What a checkpoint must match to be resumed: every param that changes the computation."""
    train = {k: v for k, v in asdict(cfg.train).items() if k not in _NON_SEMANTIC}
    key = {"lambda_cycle": cfg.lambda_cycle, "lambda_identity": cfg.lambda_identity, "seed": cfg.seed,
           "model": asdict(cfg.model), "train": train, "crop": cfg.data.crop_size,
           "no_flip": cfg.data.no_flip, "data": data_hash}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class CycleGAN:
    """The four networks, their optimizers and schedulers, the pools, and one training step."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        t = cfg.train
        nets = build_networks(cfg.model, cfg.seed)
        if device.type == "cuda" and t.channels_last:
            nets = {k: v.to(memory_format=torch.channels_last) for k, v in nets.items()}
        self.nets: dict[str, nn.Module] = {k: v.to(device) for k, v in nets.items()}
        self.G_A, self.G_B, self.D_A, self.D_B = (self.nets[k] for k in ("G_A", "G_B", "D_A", "D_B"))
        fused = device.type == "cuda"
        betas = (t.beta1, t.beta2)
        self.opt_G = torch.optim.Adam(itertools.chain(self.G_A.parameters(), self.G_B.parameters()),
                                      lr=t.lr, betas=betas, fused=fused)
        self.opt_D = torch.optim.Adam(itertools.chain(self.D_A.parameters(), self.D_B.parameters()),
                                      lr=t.lr, betas=betas, fused=fused)
        rule = lambda e: lr_factor(e, t.n_epochs, t.n_epochs_decay)  # noqa: E731
        self.sched_G = torch.optim.lr_scheduler.LambdaLR(self.opt_G, rule)
        self.sched_D = torch.optim.lr_scheduler.LambdaLR(self.opt_D, rule)
        # pool_A holds fakes of domain A (from G_B) for D_B; pool_B fakes of B for D_A.
        self.pool_A = ImagePool(t.pool_size, seed=cfg.seed * 2 + 1)
        self.pool_B = ImagePool(t.pool_size, seed=cfg.seed * 2 + 2)
        self.gan_loss = GANLoss(t.gan_mode)
        self.amp = device.type == "cuda" and t.amp
        self.step_fn = self._step
        if t.compile:
            self.step_fn = torch.compile(self._step)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _step(self, real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, l1 = self.cfg, nn.functional.l1_loss
        lam, lam_idt = cfg.lambda_cycle, cfg.identity_weight
        with self._autocast():
            fake_B = self.G_A(real_A)
            rec_A = self.G_B(fake_B)
            fake_A = self.G_B(real_B)
            rec_B = self.G_A(fake_A)

        # Generators: D is frozen so the G loss does not accumulate into D's gradients.
        for d in (self.D_A, self.D_B):
            d.requires_grad_(False)
        self.opt_G.zero_grad(set_to_none=True)
        with self._autocast():
            losses = {
                "G_A": self.gan_loss(self.D_A(fake_B), True),
                "G_B": self.gan_loss(self.D_B(fake_A), True),
                "cycle_A": l1(rec_A.float(), real_A) * lam,
                "cycle_B": l1(rec_B.float(), real_B) * lam,
            }
            if lam_idt > 0:
                losses["idt_A"] = l1(self.G_A(real_B).float(), real_B) * lam_idt
                losses["idt_B"] = l1(self.G_B(real_A).float(), real_A) * lam_idt
            else:
                losses["idt_A"] = losses["idt_B"] = torch.zeros((), device=real_A.device)
        sum(losses.values()).backward()
        self.opt_G.step()

        # Discriminators on real images and on pooled (older) fakes; halved as in the paper.
        for d in (self.D_A, self.D_B):
            d.requires_grad_(True)
        self.opt_D.zero_grad(set_to_none=True)
        losses["D_A"] = self._d_loss(self.D_A, real_B, self.pool_B.query(fake_B.float()))
        losses["D_B"] = self._d_loss(self.D_B, real_A, self.pool_A.query(fake_A.float()))
        (losses["D_A"] + losses["D_B"]).backward()
        self.opt_D.step()
        return {k: v.detach() for k, v in losses.items()}

    def _d_loss(self, netD: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            loss = (self.gan_loss(netD(real), True) + self.gan_loss(netD(fake.detach()), False)) * 0.5
        if self.cfg.train.gan_mode == "wgangp":
            loss = loss + gradient_penalty(netD, real, fake.detach(), self.cfg.train.lambda_gp)
        return loss

    def step_lr(self) -> None:
        self.sched_G.step()
        self.sched_D.step()

    @property
    def lr(self) -> float:
        return self.opt_G.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "nets": {k: v.state_dict() for k, v in self.nets.items()},
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "sched_G": self.sched_G.state_dict(), "sched_D": self.sched_D.state_dict(),
            "pool_A": self.pool_A.state_dict(), "pool_B": self.pool_B.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, net in self.nets.items():
            net.load_state_dict(state["nets"][k])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.sched_G.load_state_dict(state["sched_G"])
        self.sched_D.load_state_dict(state["sched_D"])
        self.pool_A.load_state_dict(state["pool_A"], self.device)
        self.pool_B.load_state_dict(state["pool_B"], self.device)


def save_generator(net: nn.Module, cfg: Config, direction: str, path: Path) -> None:
    """A generator file holds its architecture too, so `cyclegan translate` needs nothing else."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": asdict(cfg.model), "direction": direction, "state_dict": state}, tmp)


def _sample_grid(model: CycleGAN, test_A: np.ndarray, test_B: np.ndarray):
    """input | translation | reconstruction rows for a few fixed test images, as a PIL image."""
    import torchvision

    rows = []
    with torch.no_grad():
        for x, G, F in ((test_A, model.G_A, model.G_B), (test_B, model.G_B, model.G_A)):
            real = to_tensor(x).to(model.device)
            fake = G(real)
            rows += [real, fake, F(fake)]
    grid = torchvision.utils.make_grid(torch.cat(rows).float().cpu(), nrow=len(test_A), normalize=True,
                                       value_range=(-1, 1), padding=1)
    return torchvision.transforms.functional.to_pil_image(grid)


def _write_losses(history: list[dict[str, float]]) -> None:
    if not history:
        return
    with atomic_path(paths.TRAIN_LOSSES) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _check_finite(losses: dict[str, float], step: int) -> None:
    for name, value in losses.items():
        if not math.isfinite(value):
            raise UserError(f"loss_{name} is {value} at step {step}; training stopped, the last good "
                            f"checkpoint in {paths.CHECKPOINTS} is kept. Lower train.lr or check the data")


def main(cfg: Config, args=None) -> None:
    t = cfg.train
    device = select_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)

    data = PreparedDataset.open(paths.PREPARED / dataset_name(cfg.data.dataset))
    train_A, train_B = data.array("trainA"), data.array("trainB")
    if train_A.shape[1] < cfg.data.crop_size:
        raise UserError(f"data.crop_size ({cfg.data.crop_size}) exceeds the prepared images "
                        f"({train_A.shape[1]} px); run `dvc repro prepare`")
    dataset = UnpairedTrainSet(train_A, train_B, cfg.data.crop_size, not cfg.data.no_flip, cfg.seed)
    if t.batch_size > len(dataset):
        raise UserError(f"train.batch_size ({t.batch_size}) exceeds the dataset ({len(dataset)} images per epoch)")
    steps_per_epoch = math.ceil(len(dataset) / t.batch_size)
    n_epochs_total = t.n_epochs + t.n_epochs_decay
    total_steps = steps_per_epoch * n_epochs_total
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)

    model = CycleGAN(cfg, device)
    fp = fingerprint(cfg, data.manifest.get("content_sha256", ""))
    epoch, position, step, history, run_id = 0, 0, 0, [], None
    if args is not None and getattr(args, "fresh", False):
        checkpoint.clear(paths.CHECKPOINTS)
    loaded = checkpoint.load_latest(paths.CHECKPOINTS)
    if loaded and loaded[0].get("fingerprint") != fp:
        print(f"cyclegan train: checkpoints in {paths.CHECKPOINTS} belong to other params or data; starting afresh")
        checkpoint.clear(paths.CHECKPOINTS)
        loaded = None
    if loaded:
        state, path = loaded
        model.load_state_dict(state["model"])
        checkpoint.set_rng_state(state["rng"])
        epoch, position, step = state["epoch"], state["position"], state["step"]
        history, run_id = state["history"], state["mlflow_run_id"]
        print(f"cyclegan train: resuming from {path} (epoch {epoch + 1}, step {step})")

    sample_A = data.array("testA")[: cfg.eval.n_samples or 4]
    sample_B = data.array("testB")[: cfg.eval.n_samples or 4]
    sample_A, sample_B = np.array(sample_A), np.array(sample_B)

    def save_checkpoint() -> None:
        state = {"model": model.state_dict(), "rng": checkpoint.rng_state(), "epoch": epoch,
                 "position": position, "step": step, "history": history, "mlflow_run_id": run_id,
                 "fingerprint": fp, "config": cfg.to_dict()}
        checkpoint.save(state, paths.CHECKPOINTS, step, t.keep_checkpoints)

    t_start = time.perf_counter()
    images_seen = 0
    with tracking.start_training_run(cfg, run_id) as mlflow:
        run_id = mlflow.active_run().info.run_id
        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None)
        pin = device.type == "cuda"
        while epoch < n_epochs_total and step < total_steps:
            dataset.set_epoch(epoch)
            loader = DataLoader(dataset, batch_size=t.batch_size, sampler=PositionSampler(len(dataset), position),
                                num_workers=cfg.data.num_workers, pin_memory=pin,
                                # A private generator: the loader's seed draw must not consume the
                                # global RNG, or a resumed run would see different dropout noise.
                                generator=torch.Generator().manual_seed(cfg.seed))
            window_start, window_images = time.perf_counter(), 0
            for real_A, real_B in loader:
                real_A = real_A.to(device, non_blocking=True).float().div_(127.5).sub_(1)
                real_B = real_B.to(device, non_blocking=True).float().div_(127.5).sub_(1)
                if device.type == "cuda" and t.channels_last:
                    real_A = real_A.contiguous(memory_format=torch.channels_last)
                    real_B = real_B.contiguous(memory_format=torch.channels_last)
                losses = model.step_fn(real_A, real_B)
                step += 1
                position += real_A.shape[0]
                window_images += real_A.shape[0]
                images_seen += real_A.shape[0]
                bar.update(1)
                # Reading losses synchronises with the GPU, so it happens only every log_every steps.
                if step % t.log_every == 0 or step == total_steps:
                    values = {k: float(v) for k, v in losses.items()}
                    _check_finite(values, step)
                    now = time.perf_counter()
                    row = {"step": step, "epoch": epoch + 1, "lr": model.lr,
                           **{f"loss_{k}": values[k] for k in LOSS_TERMS},
                           "images_per_s": window_images / max(now - window_start, 1e-9)}
                    history.append(row)
                    window_start, window_images = now, 0
                    mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
                    bar.set_postfix(G_A=f"{values['G_A']:.3f}", cyc=f"{values['cycle_A']:.3f}")
                if step % t.checkpoint_every == 0:
                    save_checkpoint()
                if step >= total_steps:
                    break
            if position >= len(dataset):
                epoch, position = epoch + 1, 0
                model.step_lr()
                mlflow.log_image(_sample_grid(model, sample_A, sample_B), f"samples/epoch_{epoch:04d}.png")
            save_checkpoint()
        bar.close()

        paths.MODELS.mkdir(exist_ok=True)
        save_generator(model.G_A, cfg, "A2B", paths.MODELS / "G_A.pt")
        save_generator(model.G_B, cfg, "B2A", paths.MODELS / "G_B.pt")
        _write_losses(history)
        elapsed = time.perf_counter() - t_start
        last = history[-min(len(history), 5):]
        summary = {f"loss_{k}": float(np.mean([r[f"loss_{k}"] for r in last])) for k in LOSS_TERMS} if last else {}
        summary.update({"steps": step, "epochs": epoch, "device": device.type,
                        "identity_weight_effective": cfg.identity_weight,
                        "images_per_s_this_run": images_seen / elapsed if images_seen else 0.0,
                        "train_seconds_this_run": elapsed})
        write_json(paths.TRAIN_METRICS, summary)
        mlflow.log_metrics({f"final_{k}": v for k, v in summary.items() if isinstance(v, float)}, step=step)
        mlflow.log_artifact(str(paths.TRAIN_LOSSES))
