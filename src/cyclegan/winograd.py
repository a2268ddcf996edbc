"""3x3 convolutions on CPU as Winograd F(4x4, 3x3): the same function with 4x fewer multiplications.

A stride-1 3x3 convolution over 4x4 output tiles (6x6 input tiles, overlapping by 2) equals
    Y = A^T [ (G w G^T) ⊙ (B^T d B) ] A   per tile (Lavin & Gray, 2016),
so summed over input channels it becomes 36 independent matrix products M[p] = V[p] @ U[p]^T, with
V the transformed tiles [36, tiles, C] and U the transformed filters [36, K, C]: 36 multiplications
per tile where the direct form needs 144. The products run in torch.bmm; csrc/winograd.cpp moves
data into and out of that domain (and back, for autograd), channels-last. It is compiled on the
machine that uses it, on first use (about a minute; g++ and ninja needed), into the cache dir.

Why: on CPU the ResNet blocks' 3x3 convolutions are two thirds of a training step at 128 px, and
oneDNN already runs them near the cores' fp32 peak, so only fewer operations make them faster.
The results differ from direct convolution by float rounding (~1e-5 relative), as cuDNN's own
Winograd algorithms do on GPU.
"""
from __future__ import annotations

import functools
import hashlib
import platform
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "winograd.cpp"
# Where the transforms cost less than the multiplications they save (benchmarks/conv3x3.py on a
# 2-core Zen 4): 256 channels from 32 px on, 128 channels from 64 px on; never 64 channels.
MIN_CHANNELS = 128
MIN_SIZE = 32
MIN_CHANNELS_X_SIZE = 8192


def build_dir() -> Path:
    """One build per source, torch version and Python: a changed kernel is rebuilt, never mixed."""
    from .inception import cache_dir

    # -march=native code may not run on another CPU sharing the cache (a cluster's home dir).
    key = hashlib.sha256(SOURCE.read_bytes() + _cpu_identity().encode()).hexdigest()[:12]
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{key}"
    return cache_dir() / "torch_extensions" / tag


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled kernels, or None where they cannot be built (the reason printed once)."""
    from torch.utils.cpp_extension import load

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        # -march=native: it is built where it runs. torch's file lock serialises parallel builds.
        return load("cyclegan_winograd", [str(SOURCE)], build_directory=str(directory),
                    extra_cflags=["-O3", "-march=native"], verbose=False)
    except Exception as e:  # no compiler, no ninja, no Python headers: direct convolution still works
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"cyclegan: Winograd convolution kernel not built ({reason[:200]}); using direct "
              f"convolution (slower on CPU). Set train.winograd: false to skip the attempt", file=sys.stderr)
        return None


def available() -> bool:
    return extension() is not None


class _InputTransform(torch.autograd.Function):
    """Padded input [N, C, Hp, Wp] -> transformed tiles [36, N * tiles, C]."""

    @staticmethod
    def forward(ctx, xp):
        ctx.shape = xp.shape
        return extension().input_transform_nhwc(xp.permute(0, 2, 3, 1))

    @staticmethod
    def backward(ctx, grad):
        n, _, hp, wp = ctx.shape
        return extension().input_transform_nhwc_backward(grad, n, hp, wp).permute(0, 3, 1, 2)


class _WeightTransform(torch.autograd.Function):
    """Filters [K, C, 3, 3] -> [36, K, C]."""

    @staticmethod
    def forward(ctx, weight):
        return extension().weight_transform(weight)

    @staticmethod
    def backward(ctx, grad):
        return extension().weight_transform_backward(grad)


class _OutputTransform(torch.autograd.Function):
    """Products [36, N * tiles, K] -> output [N, K, H, W] (channels-last strides)."""

    @staticmethod
    def forward(ctx, m, n, h, w):
        return extension().output_transform_nhwc(m, n, h, w).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        return extension().output_transform_nhwc_backward(grad.permute(0, 2, 3, 1)), None, None, None


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(x, weight, bias) for a 3x3 kernel, stride 1, no padding: x is already padded."""
    n, _, hp, wp = x.shape
    m = torch.bmm(_InputTransform.apply(x), _WeightTransform.apply(weight).transpose(1, 2))
    # The rest of the network runs in the default (contiguous) format, faster there on CPU.
    y = _OutputTransform.apply(m, n, hp - 2, wp - 2).contiguous()
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def suits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether conv3x3 is the faster way here: fp32 on CPU (not under autocast), wide and big enough."""
    channels, size = weight.shape[1], min(x.shape[-2:]) - 2
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and channels >= MIN_CHANNELS and size >= MIN_SIZE
            and channels * size >= MIN_CHANNELS_X_SIZE)
