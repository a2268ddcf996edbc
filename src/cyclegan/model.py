"""CycleGAN (Zhu et al. 2017), as the authors' models/cycle_gan_model.py computes it.

Two generators, G_A: A -> B and G_B: B -> A, and two discriminators, D_A judging B-domain images
(real ones and G_A's fakes) and D_B judging A-domain ones. One training step:

  fake_B = G_A(real_A), rec_A = G_B(fake_B)         forward cycle   A -> B -> A
  fake_A = G_B(real_B), rec_B = G_A(fake_A)         backward cycle  B -> A -> B
  generators, with D frozen:
    L_G = L_GAN(D_A(fake_B), real) + L_GAN(D_B(fake_A), real)                  (paper eq. 1)
        + lambda_cycle * (|rec_A - real_A|_1 + |rec_B - real_B|_1)             (eq. 2)
        + lambda_cycle * lambda_identity * (|G_A(real_B) - real_B|_1 + |G_B(real_A) - real_A|_1)
  discriminators, on real images and on fakes drawn from a history pool (Shrivastava et al.):
    L_D_A = (L_GAN(D_A(real_B), real) + L_GAN(D_A(pool_B(fake_B)), fake)) / 2, likewise L_D_B

L_GAN is least squares (LSGAN) in the paper; vanilla and WGAN-GP are the authors' options too.
Adam(lr, (beta1, beta2)) for both pairs; the LR is constant for n_epochs, then decays linearly
over n_epochs_decay (`lr_factor`), stepped once per epoch by the caller.

Only the algorithm lives here. The driver (cyclegan.stages.train) decides the device, the
precision and the memory layout, and may wrap the networks the step calls (DDP, torch.compile)
with `wrap`; `nets` always holds the plain modules, which is what checkpoints store. Saving and
restoring a model's state for a resumed run is cyclegan.training_state.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from . import checkpoint
from .config import Config
from .losses import GANLoss, ImagePool, gradient_penalty
from .networks import architecture, build_networks

LOSS_TERMS = ("D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B")


def lr_factor(epoch: int, n_epochs: int, n_epochs_decay: int) -> float:
    """The authors' linear rule for 0-based epoch `epoch`: constant for n_epochs, then linear to 0.

    This is their lambda_rule with epoch_count=1, stepped at the end of each epoch, so epoch
    n_epochs + n_epochs_decay (1-based) trains at 1/(n_epochs_decay+1) of the initial rate; the
    2023 version of their loop steps at the start of the epoch instead and trains its last
    epoch at rate 0.
    """
    return 1.0 - max(0, epoch + 1 - n_epochs) / float(n_epochs_decay + 1)


class CycleGAN:
    """The four networks, their optimizers, schedulers and image pools, and the training step.

    `rank` is this process's in a multi-process job: each process pools its own fakes, with its
    own random stream; rank 0's is a single process's.
    """

    def __init__(self, cfg: Config, device: torch.device, *, rank: int = 0, bf16: bool = False,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.cfg, self.device, self.bf16, self.memory_format = cfg, device, bf16, memory_format
        t, m = cfg.train, cfg.model
        self.nets: dict[str, nn.Module] = {
            k: v.to(device=device, memory_format=memory_format)
            for k, v in build_networks(m, cfg.seed).items()}
        self._run = dict(self.nets)                                # what the step calls
        self._judge = {k: self.nets[k] for k in ("D_A", "D_B")}    # D in the G phase, see `wrap`

        betas = (t.beta1, t.beta2)
        params = {k: list(v.parameters()) for k, v in self.nets.items()}
        # Fused Adam: one kernel over all tensors instead of several per tensor; on CPU too, where
        # it makes the optimizer steps of the default model 3x faster.
        self.opt_G = torch.optim.Adam(params["G_A"] + params["G_B"], lr=t.lr, betas=betas, fused=True)
        self.opt_D = torch.optim.Adam(params["D_A"] + params["D_B"], lr=t.lr, betas=betas, fused=True)
        rule = lambda e: lr_factor(e, t.n_epochs, t.n_epochs_decay)  # noqa: E731
        self.sched_G = torch.optim.lr_scheduler.LambdaLR(self.opt_G, rule)
        self.sched_D = torch.optim.lr_scheduler.LambdaLR(self.opt_D, rule)
        # pool_A holds fakes of domain A (from G_B) for D_B; pool_B fakes of B for D_A.
        pool_seeds = np.random.SeedSequence([cfg.seed, rank]).generate_state(2)
        self.pool_A = ImagePool(t.pool_size, seed=int(pool_seeds[0]))
        self.pool_B = ImagePool(t.pool_size, seed=int(pool_seeds[1]))
        self.gan_loss = GANLoss(t.gan_mode)
        # With per-sample normalisation (instance norm, or none) a network's output for one image
        # does not depend on the others in its batch, so calls of one network can run as one
        # batch: the translation G_A(real_A) with the identity G_A(real_B), G_B(real_B) with
        # G_B(real_A) and the reconstruction G_B(fake_B), and D(real) with D(fake) in the D phase:
        # 3 generator and 2 discriminator calls per step instead of 6 and 4, a step ~15% faster
        # on CPU (benchmarks/train_step.py --separate-calls). Not for an architecture that mixes
        # its batch (networks.Architecture.per_sample), nor with BatchNorm, whose statistics
        # would mix the inputs, nor (for G) with dropout, whose masks would be drawn in another
        # order. The result equals separate calls up to float rounding (tests/test_train.py).
        self.batch_generators = (architecture(m.netG).per_sample and m.norm != "batch" and not m.use_dropout
                                 and cfg.identity_weight > 0)
        self.batch_discriminators = m.norm != "batch"

    def wrap(self, wrapper: Callable[[nn.Module, bool], nn.Module]) -> None:
        """Have the step call `wrapper(net, synced)` instead of each plain network.

        synced is False for the discriminators' calls in the generator phase. A DDP wrapper
        all-reduces a module's gradients in the backward that follows a call, and expects every
        parameter to get one there; the generator loss runs D with its parameters frozen (as the
        authors freeze them), so those calls must not go through DDP. The generators only run
        through their wrappers: every G phase ends in one backward over all their parameters.
        The WGAN-GP penalty calls the plain D too: torch.autograd.grad is not a DDP backward; its
        second-order terms reach D's parameters in the D phase's backward, where DDP all-reduces
        them with the rest.
        """
        self._run = {k: wrapper(net, True) for k, net in self.nets.items()}
        self._judge = {k: wrapper(self.nets[k], False) for k in ("D_A", "D_B")}

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
        """The end of an epoch: both schedulers step."""
        with warnings.catch_warnings():
            # A run resumed at the end of an epoch steps the schedulers before this process has
            # stepped an optimizer, which torch mistakes for the pre-1.1 call order.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step",
                                    category=UserWarning)
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
