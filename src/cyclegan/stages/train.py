"""`cyclegan train`: train CycleGAN on data/prepared/<name>, resuming from models/checkpoints.

Writes models/G_A.pt (A->B) and models/G_B.pt (B->A), metrics/train.json, the per-step loss
plot metrics/train_losses.csv, and logs params, losses, LR, throughput, a sample grid per epoch
and (train.eval_every) FID/KID to MLflow.

The step is the authors' CycleGAN (Zhu et al. 2017, cycle_gan_model.py): G_A maps A to B and D_A
judges B images; the generators are updated first, on LSGAN + cycle (lambda_cycle) + identity
(lambda_cycle * lambda_identity) losses with the discriminators frozen, then the discriminators
on real images and pooled fakes with their loss halved; Adam(lr, (beta1, beta2)); the LR stays
constant for n_epochs and decays linearly over n_epochs_decay, stepped once per epoch; an epoch
is max(|A|, |B|) samples, each A image with a random B image.

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
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import checkpoint, paths, tracking
from ..config import Config
from ..device import keep_freed_memory, resolve_device, use_bf16
from ..data import PositionSampler, PreparedDataset, UnpairedTrainSet, to_tensor
from ..errors import UserError
from ..fileio import atomic_path, write_json
from ..losses import GANLoss, ImagePool, gradient_penalty
from ..models import build_networks, use_winograd

LOSS_TERMS = ("D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B")
# Columns of metrics/train_losses.csv that depend on the machine rather than on the training.
TIMING_COLUMNS = ("images_per_s",)
# Params that change what is computed are in the fingerprint; these (logging, checkpoint cadence,
# where and how fast it runs) may change between a run and its resumption.
_NON_SEMANTIC = ("device", "threads", "log_every", "checkpoint_every", "keep_checkpoints",
                 "eval_every", "max_steps", "compile", "precision", "winograd")


def add_arguments(parser) -> None:
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")


# --- setup -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job; rank 0 of 1 when started without torchrun."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_distributed(device_setting: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, ...), if any."""
    device = resolve_device(device_setting, "train.device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {rank} wants GPU {local_rank} but {torch.cuda.device_count()} are visible; "
                            f"lower torchrun's --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size()), device


def configure_torch(cfg: Config, device: torch.device, rank: int) -> None:
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        # Deterministic mode costs GPU speed: cuDNN stops benchmarking convolution algorithms
        # and uses only its deterministic ones (often not the fastest), cuBLAS gets a fixed
        # workspace, and the ReflectionPad2d backward is replaced by a slower gather
        # (`DeterministicReflectionPad2d`). On CPU the kernels used here are deterministic
        # anyway: the flag changes nothing there.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # warn_only: an op without a deterministic kernel warns instead of stopping a long run.
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        keep_freed_memory()
    # Each rank its own stream (dropout, WGAN-GP interpolation); rank 0's equals a single process's.
    torch.manual_seed(cfg.seed + rank)


def lr_factor(epoch: int, n_epochs: int, n_epochs_decay: int) -> float:
    """The authors' linear rule for 0-based epoch `epoch`: constant for n_epochs, then linear to 0.

    This is their lambda_rule with epoch_count=1, stepped at the end of each epoch, so epoch
    n_epochs + n_epochs_decay (1-based) trains at 1/(n_epochs_decay+1) of the initial rate; the
    2023 version of their loop steps at the start of the epoch instead and trains its last
    epoch at rate 0.
    """
    return 1.0 - max(0, epoch + 1 - n_epochs) / float(n_epochs_decay + 1)


def fingerprint(cfg: Config, data_hash: str, world: int = 1, bf16: bool = False) -> str:
    """What a checkpoint must match to be resumed: every param that changes the computation.

    The number of processes is part of it: it sets the global batch and which rank draws which
    sample. So is the precision actually used, not its setting: `auto` and `fp32` compute the
    same on CPU.
    """
    train = {k: v for k, v in asdict(cfg.train).items() if k not in _NON_SEMANTIC}
    key = {"lambda_cycle": cfg.lambda_cycle, "lambda_identity": cfg.lambda_identity, "seed": cfg.seed,
           "model": asdict(cfg.model), "train": train, "crop": cfg.data.crop_size,
           "no_flip": cfg.data.no_flip, "data": data_hash, "world": world, "bf16": bf16}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class DeterministicReflectionPad2d(nn.Module):
    """nn.ReflectionPad2d built from slices, flips and concatenations.

    The forward copies exactly the values nn.ReflectionPad2d does. The backward adds each
    reflected gradient to its source pixel in a fixed order, where CUDA's reflection_pad2d
    backward uses atomicAdd: the only kernel of these networks without a deterministic version.
    """

    def __init__(self, padding: tuple[int, int, int, int]):
        super().__init__()
        self.left, self.right, self.top, self.bottom = padding

    @staticmethod
    def _reflect(x: torch.Tensor, before: int, after: int, dim: int) -> torch.Tensor:
        n = x.shape[dim]
        parts = [x.narrow(dim, 1, before).flip(dim)] if before else []
        parts.append(x)
        if after:
            parts.append(x.narrow(dim, n - 1 - after, after).flip(dim))
        return torch.cat(parts, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._reflect(x, self.left, self.right, -1)
        return self._reflect(x, self.top, self.bottom, -2)


def _replace_reflection_pads(net: nn.Module) -> None:
    for name, child in net.named_children():
        if isinstance(child, nn.ReflectionPad2d):
            setattr(net, name, DeterministicReflectionPad2d(child.padding))
        else:
            _replace_reflection_pads(child)


# --- the model and its step --------------------------------------------------------------------

class CycleGAN:
    """The four networks, their optimizers, schedulers and image pools, and the training step.

    `nets` holds the plain modules: what checkpoints and generator files store. The step calls
    them through wrappers: DistributedDataParallel when several processes train, then
    torch.compile when asked (CUDA only).

    DDP and the two phases of a step. DDP all-reduces a module's gradients in the backward pass
    that follows a call of its wrapper, and expects every parameter to get a gradient there. The
    generator loss runs the discriminators too, but must neither give them gradients nor leave
    their DDP waiting for them, so the G phase calls the discriminators' plain modules with their
    parameters frozen (as the authors freeze them), and only the D phase calls their wrappers.
    The generators only run through their wrappers: every G phase ends in one backward over all
    their parameters. The WGAN-GP penalty calls the plain D too: torch.autograd.grad is not a
    DDP backward; its second-order terms reach D's parameters in the D phase's backward, where
    DDP all-reduces them with the rest.
    """

    def __init__(self, cfg: Config, device: torch.device, rank: int = 0, world: int = 1):
        self.cfg, self.device = cfg, device
        t, m = cfg.train, cfg.model
        cuda = device.type == "cuda"
        self.bf16 = use_bf16(t.precision, device, "train.precision")
        self.memory_format = torch.channels_last if cuda and t.channels_last else torch.contiguous_format
        nets = build_networks(m, cfg.seed)
        if cuda and t.deterministic:
            for net in nets.values():
                _replace_reflection_pads(net)
        self.nets: dict[str, nn.Module] = {
            k: v.to(device=device, memory_format=self.memory_format) for k, v in nets.items()}
        if t.winograd:  # each layer decides per call, and only a call that gains builds the kernel
            for k in ("G_A", "G_B"):
                use_winograd(self.nets[k])

        def wrap(net: nn.Module, distributed: bool) -> nn.Module:
            if distributed:
                # No buffer sync before each forward: the only buffers are BatchNorm running
                # statistics, used at test time; rank 0's are the ones saved either way, and
                # overwriting them before D's second forward of a step would modify tensors
                # that autograd saved in the first.
                net = DistributedDataParallel(net, device_ids=[device] if cuda else None,
                                              forward_sync_buffers=False)
            return torch.compile(net, dynamic=False) if cuda and t.compile else net

        self._run = {k: wrap(net, world > 1) for k, net in self.nets.items()}
        self._judge = {k: wrap(self.nets[k], False) for k in ("D_A", "D_B")}  # D in the G phase

        betas = (t.beta1, t.beta2)
        params = {k: list(v.parameters()) for k, v in self.nets.items()}
        # Fused Adam: one kernel over all tensors instead of several per tensor; on CPU too, where
        # it makes the optimizer steps of the default model 3x faster.
        self.opt_G = torch.optim.Adam(params["G_A"] + params["G_B"], lr=t.lr, betas=betas, fused=True)
        self.opt_D = torch.optim.Adam(params["D_A"] + params["D_B"], lr=t.lr, betas=betas, fused=True)
        rule = lambda e: lr_factor(e, t.n_epochs, t.n_epochs_decay)  # noqa: E731
        self.sched_G = torch.optim.lr_scheduler.LambdaLR(self.opt_G, rule)
        self.sched_D = torch.optim.lr_scheduler.LambdaLR(self.opt_D, rule)
        # pool_A holds fakes of domain A (from G_B) for D_B; pool_B fakes of B for D_A. Each rank
        # pools its own fakes, with its own random stream.
        pool_seeds = np.random.SeedSequence([cfg.seed, rank]).generate_state(2)
        self.pool_A = ImagePool(t.pool_size, seed=int(pool_seeds[0]))
        self.pool_B = ImagePool(t.pool_size, seed=int(pool_seeds[1]))
        self.gan_loss = GANLoss(t.gan_mode)
        # With per-sample normalisation (instance norm, or none) a network's output for one image
        # does not depend on the others in its batch, so calls of one network can run as one
        # batch: the translation G_A(real_A) with the identity G_A(real_B), G_B(real_B) with
        # G_B(real_A) and the reconstruction G_B(fake_B), and D(real) with D(fake) in the D phase:
        # 3 generator and 2 discriminator calls per step instead of 6 and 4, a step ~15% faster
        # on CPU (benchmarks/train_step.py --separate-calls). Not with
        # BatchNorm, whose statistics would mix the inputs, nor (for G) with dropout, whose masks
        # would be drawn in another order. The result equals separate calls up to float rounding
        # (tests/test_train.py).
        self.batch_generators = m.norm != "batch" and not m.use_dropout and cfg.identity_weight > 0
        self.batch_discriminators = m.norm != "batch"

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _set_requires_grad(self, names: tuple[str, ...], flag: bool) -> None:
        for k in names:
            self.nets[k].requires_grad_(flag)

    def train_step(self, real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimize_parameters of the authors' code; returns the losses, still on the device.

        Nothing here waits for the GPU: the caller decides when to read the losses.
        """
        cfg, l1 = self.cfg, nn.functional.l1_loss
        G_A, G_B = self._run["G_A"], self._run["G_B"]
        identity = cfg.identity_weight > 0
        with self._autocast():
            if self.batch_generators:
                # G_B's call takes G_A's fake too: 3 generator calls, not 4.
                n = real_A.shape[0]
                fake_B, idt_A = G_A(torch.cat([real_A, real_B])).split(n)
                fake_A, idt_B, rec_A = G_B(torch.cat([real_B, real_A, fake_B])).split(n)
                rec_B = G_A(fake_A)
            else:
                # The authors' order, which fixes the order of dropout draws.
                fake_B = G_A(real_A)
                rec_A = G_B(fake_B)
                fake_A = G_B(real_B)
                rec_B = G_A(fake_A)
                if identity:
                    idt_A, idt_B = G_A(real_B), G_B(real_A)

        # Generators. D is frozen so the G loss leaves no gradient in D.
        self._set_requires_grad(("D_A", "D_B"), False)
        self.opt_G.zero_grad(set_to_none=True)
        with self._autocast():
            losses = {
                "G_A": self.gan_loss(self._judge["D_A"](fake_B), True),
                "G_B": self.gan_loss(self._judge["D_B"](fake_A), True),
                "cycle_A": l1(rec_A.float(), real_A) * cfg.lambda_cycle,
                "cycle_B": l1(rec_B.float(), real_B) * cfg.lambda_cycle,
            }
            if identity:
                # idt_A = G_A(b) should be b: it keeps G_A from changing colours needlessly.
                losses["idt_A"] = l1(idt_A.float(), real_B) * cfg.identity_weight
                losses["idt_B"] = l1(idt_B.float(), real_A) * cfg.identity_weight
            else:
                losses["idt_A"] = losses["idt_B"] = torch.zeros((), device=real_A.device)
        sum(losses.values()).backward()
        self.opt_G.step()

        # Discriminators, on real images and on pooled fakes from the generators before this
        # update (so older fakes too); each D loss is halved, which slows D relative to G.
        self._set_requires_grad(("D_A", "D_B"), True)
        self.opt_D.zero_grad(set_to_none=True)
        losses["D_A"] = self._d_loss("D_A", real_B, self.pool_B.query(fake_B.float()))
        losses["D_B"] = self._d_loss("D_B", real_A, self.pool_A.query(fake_A.float()))
        (losses["D_A"] + losses["D_B"]).backward()
        self.opt_D.step()
        return {k: losses[k].detach() for k in LOSS_TERMS}

    def _d_loss(self, name: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        netD, fake = self._run[name], fake.detach()  # a pool of size 0 hands back G's own output
        with self._autocast():
            if self.batch_discriminators:
                pred_real, pred_fake = netD(torch.cat([real, fake])).split(real.shape[0])
            else:
                pred_real, pred_fake = netD(real), netD(fake)
            loss = (self.gan_loss(pred_real, True) + self.gan_loss(pred_fake, False)) * 0.5
        if self.cfg.train.gan_mode == "wgangp":
            loss = loss + gradient_penalty(self.nets[name], real, fake, self.cfg.train.lambda_gp)
        return loss

    def step_lr(self) -> None:
        with warnings.catch_warnings():
            # A run resumed at the end of an epoch steps the schedulers before this process has
            # stepped an optimizer, which torch mistakes for the pre-1.1 call order.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.sched_G.step()
            self.sched_D.step()

    @property
    def lr(self) -> float:
        return self.opt_G.param_groups[0]["lr"]

    def non_finite_network(self) -> str | None:
        """The first network with a NaN or inf parameter, if any (one device sync per network)."""
        for name, net in self.nets.items():
            if not bool(torch.stack([p.isfinite().all() for p in net.parameters()]).all()):
                return name
        return None

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Translation inside training: eval mode as `translate` runs it, no gradients, and the RNG
        states put back afterwards, so sample grids and evaluations never change the training."""
        rng = checkpoint.rng_state()
        for net in self.nets.values():
            net.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for net in self.nets.values():
                net.train()
            checkpoint.set_rng_state(rng)

    def state_dict(self) -> dict[str, Any]:
        """What all ranks share: the networks, optimizers and schedulers."""
        return {
            "nets": {k: v.state_dict() for k, v in self.nets.items()},
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "sched_G": self.sched_G.state_dict(), "sched_D": self.sched_D.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, net in self.nets.items():
            net.load_state_dict(state["nets"][k])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.sched_G.load_state_dict(state["sched_G"])
        self.sched_D.load_state_dict(state["sched_D"])

    def rank_state(self) -> dict[str, Any]:
        """What each rank has of its own: its image pools and RNG states."""
        return {"pool_A": self.pool_A.state_dict(), "pool_B": self.pool_B.state_dict(),
                "rng": checkpoint.rng_state()}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        for pool, key in ((self.pool_A, "pool_A"), (self.pool_B, "pool_B")):
            pool.load_state_dict(state[key], self.device)
            pool.images = [img.contiguous(memory_format=self.memory_format) for img in pool.images]
        checkpoint.set_rng_state(state["rng"])


class NonFiniteGuard:
    """Remembers the first step whose losses were not all finite, and which terms were not.

    The bookkeeping stays on the device, so a GPU step needs no host sync; `check` reads it (one
    sync) and is called every step on CPU, where that costs nothing, and at log steps and before
    every checkpoint or model write on GPU. Either way the error names the exact step.
    """

    NEVER = torch.iinfo(torch.int64).max

    def __init__(self, device: torch.device):
        self.first = torch.full((), self.NEVER, dtype=torch.int64, device=device)
        self.values = torch.zeros(len(LOSS_TERMS), device=device)

    def update(self, losses: dict[str, torch.Tensor], step: int) -> None:
        values = torch.stack([losses[k].float() for k in LOSS_TERMS])
        new = (self.first == self.NEVER) & ~values.isfinite().all()
        self.first = torch.where(new, step, self.first)
        self.values = torch.where(new, values, self.values)

    def check(self, ddp: Distributed) -> None:
        first = self.first.clone()
        if ddp.active:  # every rank must stop, at the earliest bad step of any rank
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first)
        if step == self.NEVER:
            return
        values = torch.where(self.first == first, self.values, torch.zeros_like(self.values))
        if ddp.active:
            bad = (~values.isfinite()).to(torch.int32)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            values = torch.where(bad.bool(), torch.nan, values)
        bad_terms = [f"loss_{k} is {v}" for k, v in zip(LOSS_TERMS, values.tolist()) if not math.isfinite(v)]
        kept = checkpoint.list_checkpoints(paths.CHECKPOINTS)
        kept_note = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was written"
        raise UserError(f"{', '.join(bad_terms)} at step {step}; training stopped, {kept_note}. "
                        f"Lower train.lr or check the data")


# --- outputs --------------------------------------------------------------------------------------

def save_generator(net: nn.Module, cfg: Config, direction: str, path: Path) -> None:
    """A generator file holds its architecture too, so `cyclegan translate` needs nothing else."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": asdict(cfg.model), "direction": direction, "state_dict": state}, tmp)


def _sample_grid(model: CycleGAN, test_A: np.ndarray, test_B: np.ndarray):
    """input | translation | reconstruction rows for a few fixed test images, as a PIL image."""
    import torchvision

    rows = []
    with model.inference():
        for x, G, F in ((test_A, "G_A", "G_B"), (test_B, "G_B", "G_A")):
            real = to_tensor(x).to(model.device)
            fake = model.nets[G](real)
            rows += [real, fake, model.nets[F](fake)]
    grid = torchvision.utils.make_grid(torch.cat(rows).float().cpu(), nrow=len(test_A), normalize=True,
                                       value_range=(-1, 1), padding=1)
    return torchvision.transforms.functional.to_pil_image(grid)


def _fid_kid(model: CycleGAN, cfg: Config, test_A: np.ndarray, test_B: np.ndarray) -> dict[str, float]:
    """FID/KID of the test sets' translations, as the evaluate stage scores them."""
    from .evaluate import fid_kid  # lazily: torch-fidelity and Inception load only when asked
    from .translate import translate_array

    out: dict[str, float] = {}
    for direction, G, source, reference in (("A2B", "G_A", test_A, test_B), ("B2A", "G_B", test_B, test_A)):
        with model.inference():
            fake = translate_array(model.nets[G], source, cfg.eval.batch_size, model.device)
        scores = fid_kid(fake, reference, cfg)
        out[f"train_fid_{direction}"] = scores["fid"]
        out[f"train_kid_{direction}"] = scores["kid"]
    return out


def _write_losses(history: list[dict[str, float]]) -> None:
    if not history:
        return
    with atomic_path(paths.TRAIN_LOSSES) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _gather(obj: Any, ddp: Distributed) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on rank 0."""
    if not ddp.active:
        return [obj]
    out = [None] * ddp.world if ddp.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def _broadcast(obj: Any, ddp: Distributed) -> Any:
    """Rank 0's obj on every rank: one disk read, and no shared file system needed across nodes."""
    if not ddp.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def _load_checkpoint(fp: str, fresh: bool) -> dict[str, Any] | None:
    if fresh:
        checkpoint.clear(paths.CHECKPOINTS)
    loaded = checkpoint.load_latest(paths.CHECKPOINTS)
    if loaded is None:
        return None
    state, path = loaded
    if state.get("fingerprint") != fp:
        print(f"cyclegan train: the checkpoints in {paths.CHECKPOINTS} belong to other params or data; "
              f"starting afresh")
        checkpoint.clear(paths.CHECKPOINTS)
        return None
    print(f"cyclegan train: resuming from {path} (epoch {state['epoch'] + 1}, step {state['step']})")
    return state


def main(cfg: Config, args=None) -> None:
    ddp, device = init_distributed(cfg.train.device)
    try:
        train(cfg, ddp, device, fresh=bool(getattr(args, "fresh", False)))
    finally:
        if ddp.active:
            dist.destroy_process_group()


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

    model = CycleGAN(cfg, device, ddp.rank, ddp.world)
    fp = fingerprint(cfg, data.manifest.get("content_sha256", ""), ddp.world, model.bf16)
    state = _broadcast(_load_checkpoint(fp, fresh) if ddp.main else None, ddp)
    progress, history, run_id = Progress(), [], None
    if state is not None:
        model.load_state_dict(state["model"])
        model.load_rank_state(state["ranks"][ddp.rank])
        progress = Progress(state["epoch"], state["position"], state["step"])
        history, run_id = state["history"], state["mlflow_run_id"]
        del state  # the loaded copy of every tensor is no longer needed
    if ddp.main:
        print(f"cyclegan train: {total_steps} steps ({n_epochs_total} epochs of {steps_per_epoch} steps, "
              f"global batch {global_batch}) on {ddp.world} x {device.type}, "
              f"{'bf16 autocast' if model.bf16 else 'fp32'}")

    n_samples = cfg.eval.n_samples or 4
    sample_A, sample_B = np.array(data.array("testA")[:n_samples]), np.array(data.array("testB")[:n_samples])
    guard = NonFiniteGuard(device)
    check_every_step = device.type == "cpu"

    def save_checkpoint() -> None:
        guard.check(ddp)
        bad_net = model.non_finite_network()
        if bad_net:
            raise UserError(f"{bad_net} has NaN or inf weights after step {progress.step}; training stopped, "
                            f"no checkpoint written. Lower train.lr or check the data")
        ranks = _gather(model.rank_state(), ddp)
        if ddp.main:
            checkpoint.save({"model": model.state_dict(), "ranks": ranks, "epoch": progress.epoch,
                             "position": progress.position, "step": progress.step, "history": history,
                             "mlflow_run_id": run_id, "fingerprint": fp, "config": cfg.to_dict(),
                             "world": ddp.world}, paths.CHECKPOINTS, progress.step, t.keep_checkpoints)
            _write_losses(history)

    def to_device(images: torch.Tensor) -> torch.Tensor:
        # uint8 crosses to the device (a quarter of the bytes of float) and is converted there.
        x = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=model.memory_format)

    run = tracking.start_training_run(cfg, run_id) if ddp.main else contextlib.nullcontext()
    t_start, images_seen = time.perf_counter(), 0
    with run as mlflow:
        logged_step = logged_epoch = 0
        if ddp.main:
            run_id = mlflow.active_run().info.run_id
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
                losses = model.train_step(to_device(real_A), to_device(real_B))
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
                    values = torch.stack([losses[k].float() for k in LOSS_TERMS])
                    if ddp.active:  # the global batch's loss: the mean of the ranks' batch means
                        dist.all_reduce(values)
                        values /= ddp.world
                    values = dict(zip(LOSS_TERMS, values.tolist()))
                    now = time.perf_counter()
                    row = {"step": progress.step, "epoch": progress.epoch + 1, "lr": model.lr,
                           **{f"loss_{k}": values[k] for k in LOSS_TERMS},
                           "images_per_s": window_images / max(now - window_start, 1e-9)}
                    window_start, window_images = now, 0
                    history.append(row)
                    if ddp.main and progress.step > logged_step:
                        mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=progress.step)
                        bar.set_postfix(G_A=f"{values['G_A']:.3f}", cyc=f"{values['cycle_A']:.3f}")
                if progress.step % t.checkpoint_every == 0:
                    save_checkpoint()
                if progress.step >= total_steps:
                    break
            if progress.position >= epoch_size:
                progress.epoch, progress.position = progress.epoch + 1, 0
                model.step_lr()
                if ddp.main:
                    mlflow.log_image(_sample_grid(model, sample_A, sample_B),
                                     f"samples/epoch_{progress.epoch:04d}.png")
                    if t.eval_every and progress.epoch % t.eval_every == 0 and progress.epoch > logged_epoch:
                        test_A, test_B = np.array(data.array("testA")), np.array(data.array("testB"))
                        mlflow.log_metrics(_fid_kid(model, cfg, test_A, test_B), step=progress.epoch)
                ddp.barrier()  # the other ranks wait while rank 0 evaluates
            save_checkpoint()
        bar.close()

        guard.check(ddp)
        if ddp.main:
            paths.MODELS.mkdir(exist_ok=True)
            save_generator(model.nets["G_A"], cfg, "A2B", paths.MODELS / "G_A.pt")
            save_generator(model.nets["G_B"], cfg, "B2A", paths.MODELS / "G_B.pt")
            _write_losses(history)
            elapsed = time.perf_counter() - t_start
            last = history[-min(len(history), 5):]
            summary: dict[str, Any] = (
                {f"loss_{k}": float(np.mean([r[f"loss_{k}"] for r in last])) for k in LOSS_TERMS} if last else {})
            summary.update({"steps": progress.step, "epochs": progress.epoch, "device": device.type,
                            "processes": ddp.world, "global_batch": global_batch,
                            "identity_weight_effective": cfg.identity_weight,
                            "images_per_s_this_run": images_seen / elapsed if images_seen else 0.0,
                            "train_seconds_this_run": elapsed})
            write_json(paths.TRAIN_METRICS, summary)
            mlflow.log_metrics({f"final_{k}": v for k, v in summary.items() if isinstance(v, float)},
                               step=progress.step)
            mlflow.log_artifact(str(paths.TRAIN_LOSSES))
    ddp.barrier()
