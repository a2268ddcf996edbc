"""The CycleGAN networks of Zhu et al. 2017, as in the authors' PyTorch code.

Generators: a ResNet (2 stride-2 downsamplings, N residual blocks, 2 upsamplings) and a U-Net.
Discriminators: the 70x70 PatchGAN ("basic", 3 layers), an N-layer PatchGAN and a 1x1 PixelGAN.
Normalisation follows the official defaults: InstanceNorm without affine parameters or running
statistics; with BatchNorm the convolutions drop their bias, since BN has its own shift.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # config imports this module for the names of the generators
    from .config import ModelConfig


def norm_layer(kind: str):
    if kind == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if kind == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if kind == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


def _conv_bias(norm: str) -> bool:
    # InstanceNorm without affine has no shift of its own, so the official code keeps the bias.
    return norm != "batch"


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, norm: str, use_dropout: bool):
        super().__init__()
        Norm, bias = norm_layer(norm), _conv_bias(norm)
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), Norm(dim), nn.ReLU(True)]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), Norm(dim)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    def __init__(self, in_ch=3, out_ch=3, ngf=64, n_blocks=9, norm="instance", use_dropout=False):
        super().__init__()
        Norm, bias = norm_layer(norm), _conv_bias(norm)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3), nn.Conv2d(in_ch, ngf, 7, bias=bias), Norm(ngf), nn.ReLU(True)]
        ch = ngf
        for _ in range(2):
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1, bias=bias), Norm(ch * 2), nn.ReLU(True)]
            ch *= 2
        layers += [ResnetBlock(ch, norm, use_dropout) for _ in range(n_blocks)]
        for _ in range(2):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                       Norm(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_ch, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UnetBlock(nn.Module):
    """One level of the U-Net: down, the inner levels, up, then concatenated with the input."""

    def __init__(self, outer: int, inner: int, in_ch: int | None = None, sub: nn.Module | None = None,
                 outermost=False, innermost=False, norm="instance", use_dropout=False):
        super().__init__()
        self.outermost = outermost
        Norm, bias = norm_layer(norm), _conv_bias(norm)
        in_ch = outer if in_ch is None else in_ch
        down = nn.Conv2d(in_ch, inner, 4, stride=2, padding=1, bias=bias)
        if outermost:
            up = nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1)
            layers = [down, sub, nn.ReLU(True), up, nn.Tanh()]
        elif innermost:
            up = nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1, bias=bias)
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, Norm(outer)]
        else:
            up = nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1, bias=bias)
            layers = [nn.LeakyReLU(0.2, True), down, Norm(inner), sub, nn.ReLU(True), up, Norm(outer)]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    def __init__(self, in_ch=3, out_ch=3, num_downs=8, ngf=64, norm="instance", use_dropout=False):
        super().__init__()
        block = UnetBlock(ngf * 8, ngf * 8, innermost=True, norm=norm)
        for _ in range(num_downs - 5):
            block = UnetBlock(ngf * 8, ngf * 8, sub=block, norm=norm, use_dropout=use_dropout)
        for mult in (4, 2, 1):
            block = UnetBlock(ngf * mult, ngf * mult * 2, sub=block, norm=norm)
        self.model = UnetBlock(out_ch, ngf, in_ch=in_ch, sub=block, outermost=True, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: with n_layers=3 each output pixel sees a 70x70 patch of the input."""

    def __init__(self, in_ch=3, ndf=64, n_layers=3, norm="instance"):
        super().__init__()
        Norm, bias = norm_layer(norm), _conv_bias(norm)
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=bias),
                       Norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=bias),
                   Norm(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PixelDiscriminator(nn.Module):
    """1x1 PatchGAN: judges each pixel's colour on its own."""

    def __init__(self, in_ch=3, ndf=64, norm="instance"):
        super().__init__()
        Norm, bias = norm_layer(norm), _conv_bias(norm)
        self.model = nn.Sequential(
            nn.Conv2d(in_ch, ndf, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, 1, bias=bias), Norm(ndf * 2), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, 1, 1, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def init_weights(net: nn.Module, init_type: str, gain: float,
                 generator: torch.Generator | None = None) -> None:
    """Official initialisation: conv weights from `init_type` with `gain`, biases 0, BN weights N(1, gain)."""
    def init(m: nn.Module) -> None:
        name = type(m).__name__
        if hasattr(m, "weight") and m.weight is not None and ("Conv" in name or "Linear" in name):
            w = m.weight.data
            if init_type == "normal":
                w.normal_(0.0, gain, generator=generator)
            elif init_type == "xavier":
                nn.init.xavier_normal_(w, gain=gain, generator=generator)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(w, a=0, mode="fan_in", generator=generator)
            elif init_type == "orthogonal":
                nn.init.orthogonal_(w, gain=gain, generator=generator)
            else:
                raise ValueError(f"unknown init {init_type!r}")
            if getattr(m, "bias", None) is not None:
                m.bias.data.zero_()
        elif "BatchNorm2d" in name:
            m.weight.data.normal_(1.0, gain, generator=generator)
            m.bias.data.zero_()
    net.apply(init)


@dataclass(frozen=True)
class Architecture:
    """A generator architecture: how to build it from the model params, and which image sides it
    returns at their own size."""

    build: Callable[[ModelConfig], nn.Module]
    # Every image side must be a multiple of this (2 ** the number of stride-2 downsamplings).
    size_multiple: int
    # Whether its output for one image is independent of the other images of its batch (given a
    # per-sample norm and no dropout): then the model may batch several calls into one.
    per_sample: bool = True


def _resnet(n_blocks: int) -> Architecture:
    return Architecture(lambda m: ResnetGenerator(ngf=m.ngf, n_blocks=n_blocks, norm=m.norm,
                                                  use_dropout=m.use_dropout), size_multiple=4)


def _unet(num_downs: int) -> Architecture:
    return Architecture(lambda m: UnetGenerator(num_downs=num_downs, ngf=m.ngf, norm=m.norm,
                                                use_dropout=m.use_dropout), size_multiple=2 ** num_downs)


# model.netG: the one list of generators; config's choices and the image-size rule come from it.
GENERATORS: dict[str, Architecture] = {
    "resnet_9blocks": _resnet(9),
    "resnet_6blocks": _resnet(6),
    "unet_256": _unet(8),
    "unet_128": _unet(7),
}


def architecture(netG: str) -> Architecture:
    try:
        return GENERATORS[netG]
    except KeyError:
        raise ValueError(f"unknown netG {netG!r}; known: {', '.join(GENERATORS)}") from None


def size_multiple(netG: str) -> int:
    """What an image side must be a multiple of for generator `netG` to return its own size."""
    return architecture(netG).size_multiple


def build_generator(cfg: ModelConfig) -> nn.Module:
    return architecture(cfg.netG).build(cfg)


def build_discriminator(cfg: ModelConfig) -> nn.Module:
    if cfg.netD == "basic":
        return NLayerDiscriminator(ndf=cfg.ndf, n_layers=3, norm=cfg.norm)
    if cfg.netD == "n_layers":
        return NLayerDiscriminator(ndf=cfg.ndf, n_layers=cfg.n_layers_D, norm=cfg.norm)
    if cfg.netD == "pixel":
        return PixelDiscriminator(ndf=cfg.ndf, norm=cfg.norm)
    raise ValueError(f"unknown netD {cfg.netD!r}")


def build_networks(cfg: ModelConfig, seed: int) -> dict[str, nn.Module]:
    """G_A: A->B, G_B: B->A, D_A judges B-domain images (fakes of G_A), D_B judges A-domain ones."""
    gen = torch.Generator().manual_seed(seed)
    nets = {"G_A": build_generator(cfg), "G_B": build_generator(cfg),
            "D_A": build_discriminator(cfg), "D_B": build_discriminator(cfg)}
    for net in nets.values():
        init_weights(net, cfg.init_type, cfg.init_gain, generator=gen)
    return nets


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


def use_deterministic_padding(net: nn.Module) -> None:
    """Replace every nn.ReflectionPad2d of `net` by DeterministicReflectionPad2d (no parameters move)."""
    for name, child in net.named_children():
        if isinstance(child, nn.ReflectionPad2d):
            setattr(net, name, DeterministicReflectionPad2d(child.padding))
        else:
            use_deterministic_padding(child)
