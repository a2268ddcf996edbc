"""Winograd F(4x4, 3x3) on CPU: the same convolution as F.conv2d, forward and backward.

The kernel is compiled for real on first use (into ~/.cache/cyclegan, or $CYCLEGAN_CACHE).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cyclegan import winograd
from cyclegan.models import Conv3x3, ResnetGenerator, use_winograd
from test_train import images, tiny_model



@pytest.fixture(scope="module")
def kernel():
    """The compiled kernel; built here, not at collection, so deselected runs never build it."""
    if not winograd.available():
        pytest.skip("the Winograd kernel cannot be built here")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).detach().abs().max() / expected.detach().abs().max())


@pytest.mark.parametrize("n, c, k, h, w", [
    (1, 64, 64, 16, 16),
    (2, 8, 5, 7, 10),      # sizes that are not multiples of 4: partial tiles at the edges
    (3, 16, 32, 5, 13),
    (1, 3, 2, 1, 1),       # a single output pixel
])
def test_equals_direct_convolution_forward_and_backward(kernel, n, c, k, h, w):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h + 2, w + 2, generator=gen, requires_grad=True)
    weight = (torch.randn(k, c, 3, 3, generator=gen) * 0.1).requires_grad_()
    bias = torch.randn(k, generator=gen, requires_grad=True)
    grad_out = torch.randn(n, k, h, w, generator=gen)

    expected = F.conv2d(x, weight, bias)
    expected.backward(grad_out)
    expected_grads = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    got = winograd.conv3x3(x, weight, bias)
    got.backward(grad_out)

    assert got.shape == expected.shape
    assert relative_error(got, expected) < 1e-5
    for t, g in zip((x, weight, bias), expected_grads):
        assert relative_error(t.grad, g) < 1e-5


def test_generator_with_winograd_computes_the_same_function(kernel):
    torch.manual_seed(0)
    direct = ResnetGenerator(ngf=64, n_blocks=2)
    fast = copy.deepcopy(direct)
    assert use_winograd(fast) == 4
    x = images(2, size=128)  # 256 channels of 32 px in the ResNet blocks
    y_direct, y_fast = direct(x), fast(x)
    assert not torch.equal(y_direct, y_fast)  # the other algorithm really ran
    assert relative_error(y_fast, y_direct) < 1e-4
    assert direct.state_dict().keys() == fast.state_dict().keys()


def test_not_used_where_it_does_not_pay():
    wide, medium, narrow = Conv3x3(256, bias=True), Conv3x3(128, bias=True), Conv3x3(64, bias=True)
    assert winograd.suits(torch.zeros(1, 256, 34, 34), wide.weight)
    assert not winograd.suits(torch.zeros(1, 256, 18, 18), wide.weight)         # too small
    assert not winograd.suits(torch.zeros(1, 256, 34, 34).double(), wide.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not winograd.suits(torch.zeros(1, 256, 34, 34), wide.weight)     # bf16: direct is faster
    assert winograd.suits(torch.zeros(1, 128, 66, 66), medium.weight)
    assert not winograd.suits(torch.zeros(1, 128, 34, 34), medium.weight)
    assert not winograd.suits(torch.zeros(1, 64, 130, 130), narrow.weight)      # too few channels


def first_step(**overrides) -> dict[str, float]:
    size = overrides.get("data", {}).get("crop_size", 28)
    losses = tiny_model(**overrides).train_step(images(1, size=size), images(1, size=size, seed=1))
    return {k: float(v) for k, v in losses.items()}


def test_training_on_cpu_uses_it_where_it_pays_and_follows_the_param(kernel):
    wide = {"model": {"ngf": 64}, "data": {"load_size": 128, "crop_size": 128}}  # 256 ch of 32 px
    on, off = first_step(**wide), first_step(**wide, train={"winograd": False})
    assert on != off  # Winograd ran: other rounding ...
    assert on == pytest.approx(off, rel=1e-4, abs=1e-6)  # ... of the same step
    narrow = {"model": {"ngf": 16}, "data": {"load_size": 128, "crop_size": 128}}  # 64 ch: no gain
    assert first_step(**narrow) == first_step(**narrow, train={"winograd": False})
    assert first_step() == first_step(train={"winograd": False})  # ngf 8, 28 px


def test_a_failed_build_falls_back_to_direct_convolution_with_one_line(tmp_path):
    env = {**os.environ, "CYCLEGAN_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    code = ("from cyclegan import winograd; import sys; "
            "sys.exit(0 if not winograd.available() else 1)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    notice = [line for line in proc.stderr.splitlines() if line.startswith("cyclegan: Winograd")]
    assert len(notice) == 1 and "using direct convolution" in notice[0] and "train.winograd" in notice[0]
