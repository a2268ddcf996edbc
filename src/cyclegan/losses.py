"""Adversarial losses (LSGAN, vanilla GAN, WGAN-GP) and the discriminators' image pool."""
from __future__ import annotations

import random

import torch
from torch import nn


class GANLoss(nn.Module):
    """Loss of a discriminator's output map against 'real' or 'fake'.

    lsgan: mean squared error against 1 / 0 (the paper's choice); vanilla: BCE on logits;
    wgangp: -mean for real, +mean for fake (the gradient penalty is added separately).
    """

    def __init__(self, mode: str):
        super().__init__()
        if mode not in ("lsgan", "vanilla", "wgangp"):
            raise ValueError(f"unknown gan_mode {mode!r}")
        self.mode = mode

    def forward(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        prediction = prediction.float()
        if self.mode == "wgangp":
            return -prediction.mean() if target_is_real else prediction.mean()
        target = torch.full_like(prediction, 1.0 if target_is_real else 0.0)
        if self.mode == "lsgan":
            return nn.functional.mse_loss(prediction, target)
        return nn.functional.binary_cross_entropy_with_logits(prediction, target)


def gradient_penalty(netD: nn.Module, real: torch.Tensor, fake: torch.Tensor, weight: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP: weight * E[(||grad D(x_hat)||_2 - 1)^2] on random interpolates of real and fake."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=generator)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    out = netD(x_hat)
    grad, = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    norm = (grad.flatten(1) + 1e-16).norm(2, dim=1)
    return weight * ((norm - 1.0) ** 2).mean()


class ImagePool:
    """History of generated images (Shrivastava et al.): D sees a mix of old and new fakes.

    Until the pool is full every fake is stored and returned; after that each fake is, with
    probability 0.5, swapped with a random stored one. The pool has its own RNG so its state can
    be checkpointed and a resumed run makes the same choices.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = random.Random(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif self.rng.random() > 0.5:
                i = self.rng.randint(0, self.size - 1)
                out.append(self.images[i].clone())
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        images = torch.cat(self.images).cpu() if self.images else torch.empty(0)
        # The RNG state goes in as plain ints so torch.load(weights_only=True) accepts it.
        version, internal, gauss = self.rng.getstate()
        return {"images": images, "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        images = state["images"]
        self.images = [img.unsqueeze(0).to(device) for img in images] if images.numel() else []
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
