"""Networks, initialisation, losses, the image pool, the LR rule and param validation."""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from cyclegan.config import ConfigError, ModelConfig, config_from_dict
from cyclegan.losses import GANLoss, ImagePool, gradient_penalty
from cyclegan.model import CycleGAN, lr_factor
from cyclegan.training_state import load_shared_state, shared_state
from cyclegan.networks import (DeterministicReflectionPad2d, build_discriminator, build_generator, build_networks,
                               use_deterministic_padding)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --- networks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("netG, norm, millions", [
    ("resnet_9blocks", "instance", 11.378),  # what the authors' code prints for CycleGAN's G
    ("unet_256", "batch", 54.414),           # ... and for pix2pix's G
])
def test_generator_sizes_match_the_authors_networks(netG, norm, millions):
    assert round(n_params(build_generator(ModelConfig(netG=netG, norm=norm))) / 1e6, 3) == millions


def test_patchgan_size_and_output():
    D = build_discriminator(ModelConfig(netD="basic"))
    assert round(n_params(D) / 1e6, 3) == 2.765
    # 70x70 PatchGAN: a 256 px image gives a 30x30 map of patch scores.
    assert D(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    pixel = build_discriminator(ModelConfig(netD="pixel", ndf=8))
    assert pixel(torch.zeros(2, 3, 20, 20)).shape == (2, 1, 20, 20)


@pytest.mark.parametrize("netG, size", [("resnet_6blocks", 32), ("resnet_9blocks", 36),
                                        ("unet_128", 128), ("unet_256", 256)])
def test_generators_keep_the_image_size_and_range(netG, size):
    G = build_generator(ModelConfig(netG=netG, ngf=4))
    with torch.no_grad():
        y = G(torch.randn(2, 3, size, size))
    assert y.shape == (2, 3, size, size)
    assert y.abs().max() <= 1


def test_instance_norm_has_no_parameters_and_batch_norm_drops_conv_bias():
    G = build_generator(ModelConfig(netG="resnet_6blocks", ngf=8))
    norms = [m for m in G.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(not m.affine and not m.track_running_stats for m in norms)
    convs = [m for m in G.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    G_bn = build_generator(ModelConfig(netG="resnet_6blocks", ngf=8, norm="batch"))
    # The last conv feeds tanh, not a norm, so it keeps its bias.
    assert sum(c.bias is None for c in G_bn.modules() if isinstance(c, nn.Conv2d)) == len(convs) - 1


def test_initialisation_is_normal_002_with_zero_bias_and_seeded():
    nets = build_networks(ModelConfig(netG="resnet_6blocks", ngf=16, ndf=16), seed=3)
    weights = torch.cat([m.weight.flatten() for net in nets.values() for m in net.modules()
                         if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert abs(weights.mean().item()) < 1e-3
    assert weights.std().item() == pytest.approx(0.02, rel=0.01)
    assert all(m.bias.abs().max() == 0 for net in nets.values() for m in net.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None)
    again = build_networks(ModelConfig(netG="resnet_6blocks", ngf=16, ndf=16), seed=3)
    other = build_networks(ModelConfig(netG="resnet_6blocks", ngf=16, ndf=16), seed=4)
    sd, sd_again, sd_other = (n["G_A"].state_dict() for n in (nets, again, other))
    assert all(torch.equal(sd[k], sd_again[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd_other[k]) for k in sd)
    # The four networks are drawn one after the other, not from the same numbers.
    assert not torch.equal(nets["G_A"].state_dict()["model.1.weight"], nets["G_B"].state_dict()["model.1.weight"])


@pytest.mark.parametrize("padding", [1, 3, (1, 2, 3, 0)])
def test_deterministic_reflection_pad_equals_reflection_pad(padding):
    x = torch.randn(2, 3, 7, 9, requires_grad=True)
    reference = nn.ReflectionPad2d(padding)
    ours = DeterministicReflectionPad2d(reference.padding)
    weight = torch.randn_like(reference(x))
    grad_ref, = torch.autograd.grad((reference(x) * weight).sum(), x)
    grad_ours, = torch.autograd.grad((ours(x) * weight).sum(), x)
    assert torch.equal(ours(x), reference(x))
    torch.testing.assert_close(grad_ours, grad_ref)


def test_deterministic_padding_replaces_every_reflection_pad_and_keeps_the_output():
    G = build_generator(ModelConfig(netG="resnet_6blocks", ngf=4))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = G(x)
    n_pads = sum(isinstance(m, nn.ReflectionPad2d) for m in G.modules())
    use_deterministic_padding(G)
    assert not any(isinstance(m, nn.ReflectionPad2d) for m in G.modules())
    assert sum(isinstance(m, DeterministicReflectionPad2d) for m in G.modules()) == n_pads == 2 + 2 * 6
    with torch.no_grad():
        assert torch.equal(G(x), expected)


# --- losses and pool ------------------------------------------------------------------------------

def test_gan_losses():
    half = torch.full((2, 1, 4, 4), 0.5)
    lsgan = GANLoss("lsgan")
    assert lsgan(half, True).item() == pytest.approx(0.25)
    assert lsgan(torch.ones(1, 1, 3, 3), True).item() == 0
    assert lsgan(torch.ones(1, 1, 3, 3), False).item() == 1
    vanilla = GANLoss("vanilla")
    assert vanilla(torch.zeros(1, 1, 2, 2), True).item() == pytest.approx(math.log(2))
    wgan = GANLoss("wgangp")
    assert wgan(half, True).item() == -0.5 and wgan(half, False).item() == 0.5
    # bf16 predictions (autocast) are scored in float32.
    assert lsgan(half.bfloat16(), True).dtype == torch.float32


def test_gradient_penalty_measures_the_distance_of_the_gradient_norm_from_one():
    x = torch.randn(3, 1, 2, 2)

    class Scaled(nn.Module):  # D(x) = s * sum(x): its input gradient has norm s * sqrt(4)
        def __init__(self, s):
            super().__init__()
            self.s = nn.Parameter(torch.tensor(s))

        def forward(self, x):
            return self.s * x.sum(dim=(1, 2, 3))

    assert gradient_penalty(Scaled(0.5), x, -x, weight=10).item() == pytest.approx(0, abs=1e-6)
    assert gradient_penalty(Scaled(1.0), x, -x, weight=10).item() == pytest.approx(10 * (2 - 1) ** 2)


def test_gradient_penalty_is_taken_at_the_seeded_random_interpolates_and_trains_D():
    class Quadratic(nn.Module):  # D(x) = s/2 * |x|^2: its input gradient is s * x, so it shows where it was taken
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.tensor(0.7))

        def forward(self, x):
            return 0.5 * self.s * (x ** 2).sum(dim=(1, 2, 3))

    real, fake = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    alpha = torch.rand(3, 1, 1, 1, generator=torch.Generator().manual_seed(5))  # one per sample
    expected = 10 * ((0.7 * (alpha * real + (1 - alpha) * fake).flatten(1).norm(dim=1) - 1) ** 2).mean()
    D = Quadratic()
    torch.manual_seed(99)  # the global RNG is not the one the penalty draws from
    penalty = gradient_penalty(D, real, fake, weight=10, generator=torch.Generator().manual_seed(5))
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    penalty.backward()  # the penalty is a loss of D: it reaches D's parameters through the gradient
    assert D.s.grad is not None and D.s.grad.abs().item() > 0


def test_image_pool_fills_then_swaps_half_the_time():
    pool = ImagePool(4, seed=0)
    first = torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first)  # filling: every image passes through
    returned_old, returned = 0, set()
    for i in range(200):
        new = torch.full((1, 1, 1, 1), 100.0 + i)
        out = pool.query(new)
        returned_old += int(out.item() != new.item())
        returned.add(out.item())
        assert len(pool.images) == 4
    assert 70 < returned_old < 130  # p = 0.5
    # A swap picks any of the 4 slots: each first image comes back, the first and the last too.
    assert {0.0, 1.0, 2.0, 3.0} <= returned
    assert torch.equal(ImagePool(0).query(first), first)


def test_an_empty_or_disabled_pool_checkpoints_and_restores():
    for size in (0, 3):  # pool_size 0 (no pool), or a checkpoint before any fake was made
        buffer = io.BytesIO()
        torch.save(ImagePool(size, seed=1).state_dict(), buffer)
        buffer.seek(0)
        restored = ImagePool(size, seed=99)
        restored.load_state_dict(torch.load(buffer, weights_only=True))
        assert restored.images == [] and restored.rng.getstate() == ImagePool(size, seed=1).rng.getstate()


def test_image_pool_state_round_trips_through_weights_only_load():
    pool = ImagePool(3, seed=1)
    for i in range(5):
        pool.query(torch.full((2, 3, 2, 2), float(i)))
    buffer = io.BytesIO()
    torch.save(pool.state_dict(), buffer)
    buffer.seek(0)
    restored = ImagePool(3, seed=99)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for i in range(10):
        x = torch.full((2, 3, 2, 2), 10.0 + i)
        assert torch.equal(pool.query(x), restored.query(x))


# --- learning rate ----------------------------------------------------------------------------------

def test_lr_is_constant_then_decays_linearly_per_epoch():
    assert [lr_factor(e, 3, 3) for e in range(6)] == [1, 1, 1, 0.75, 0.5, 0.25]
    assert lr_factor(0, 0, 4) == 0.8  # no constant phase: the decay starts at once


def test_schedulers_step_per_epoch():
    cfg = config_from_dict({"model": {"netG": "resnet_6blocks", "ngf": 4, "ndf": 4},
                            "train": {"n_epochs": 2, "n_epochs_decay": 2, "lr": 0.001}})
    model = CycleGAN(cfg, torch.device("cpu"))
    lrs = []
    for _ in range(4):
        lrs.append((model.opt_G.param_groups[0]["lr"], model.opt_D.param_groups[0]["lr"]))
        model.step_lr()
    expected = [0.001 * f for f in (1, 1, 2 / 3, 1 / 3)]
    assert [g for g, _ in lrs] == pytest.approx(expected)
    assert [d for _, d in lrs] == pytest.approx(expected)
    assert model.opt_G.param_groups[0]["betas"] == (0.5, 0.999)


def test_a_run_resumed_at_the_end_of_its_first_epoch_steps_the_lr_without_a_warning():
    # A checkpoint from the last step of epoch 1 holds schedulers that have never stepped; the
    # resumed process steps them before any optimizer step, which torch reports as the pre-1.1
    # call order. The rate must still step, and the user must not see a false alarm.
    cfg = config_from_dict({"model": {"netG": "resnet_6blocks", "ngf": 4, "ndf": 4},
                            "train": {"n_epochs": 1, "n_epochs_decay": 1, "lr": 0.001}})
    resumed = CycleGAN(cfg, torch.device("cpu"))
    load_shared_state(resumed, shared_state(CycleGAN(cfg, torch.device("cpu"))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.step_lr()
    assert [str(w.message) for w in caught] == []
    assert resumed.lr == pytest.approx(0.0005)
    assert resumed.opt_D.param_groups[0]["lr"] == pytest.approx(0.0005)


# --- params ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, key", [
    ({"bogus": 1}, "bogus"),
    ({"train": {"n_epoch": 5}}, "train.n_epoch"),
    ({"model": {"netg": "unet_128"}}, "model.netg"),
    ({"lambda_cycle": -1}, "lambda_cycle"),
    ({"lambda_identity": -0.5}, "lambda_identity"),
    ({"train": {"lambda_gp": -1.0}}, "train.lambda_gp"),
    ({"train": {"lr": 0}}, "train.lr"),
    ({"train": {"lr": -0.1}}, "train.lr"),
    ({"train": {"beta1": 1.0}}, "train.beta1"),
    ({"model": {"init_gain": -0.02}}, "model.init_gain"),
    ({"lambda_cycle": "ten"}, "lambda_cycle"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"batch_size": 1.5}}, "train.batch_size"),
    ({"train": {"pool_size": -1}}, "train.pool_size"),
    ({"train": {"n_epochs": 0, "n_epochs_decay": 0}}, "train.n_epochs"),
    ({"train": {"gan_mode": "hinge"}}, "train.gan_mode"),
    ({"model": {"norm": "group"}}, "model.norm"),
    ({"model": {"ngf": 0}}, "model.ngf"),
    ({"data": {"load_size": 32, "crop_size": 64}}, "data.crop_size"),
    ({"data": {"load_size": 30, "crop_size": 30}}, "data.crop_size"),
    ({"data": {"load_size": 128, "crop_size": 128}, "model": {"netG": "unet_256"}}, "data.crop_size"),
    ({"data": {"load_size": 64, "crop_size": 64}, "model": {"netG": "unet_128"}}, "data.crop_size"),
    ({"data": {"load_size": 8, "crop_size": 8}}, "data.crop_size"),
    ({"model": {"n_layers_D": 4}}, "model.n_layers_D"),
    ({"train": {"precision": "fp16"}}, "train.precision"),
    ({"train": {"amp": True}}, "train.amp"),  # renamed: the message names its successor
    ({"train": {"winograd": True}}, "train.winograd"),  # removed: the message says so
])
def test_bad_params_fail_with_one_line_naming_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    message = str(e.value)
    assert f"'{key}'" in message
    assert "\n" not in message
    if key == "train.amp":
        assert "'train.precision'" in message
    if key == "train.winograd":
        assert "is no longer a param" in message and "delete it" in message


@pytest.mark.parametrize("raw", [
    {"data": {"load_size": 256, "crop_size": 256}, "model": {"netG": "unet_256"}},
    {"data": {"load_size": 143, "crop_size": 128}, "model": {"netG": "unet_128"}},
    {"data": {"load_size": 286, "crop_size": 256}, "model": {"netG": "resnet_9blocks"}},
    {"lambda_identity": 0, "train": {"pool_size": 0, "n_epochs": 0, "n_epochs_decay": 1}},
])
def test_good_params_pass(raw):
    config_from_dict(raw)
