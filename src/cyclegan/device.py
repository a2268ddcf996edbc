"""Turn device settings into torch terms, shared by every stage: which device, which precision."""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import torch

from .errors import UserError


def resolve_device(setting: str, key: str) -> torch.device:
    """`auto` picks CUDA when visible; asking for CUDA without one is a one-line error naming `key`.

    So is an NVIDIA GPU that this torch build cannot use (a driver older than its CUDA needs, or a
    CPU-only build): `auto` would otherwise train on the CPU, for days, without a word.
    """
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")  # GPUs hidden on purpose
    if setting in ("auto", "cuda") and not hidden and not torch.cuda.is_available():
        driver = nvidia_driver()
        if driver is not None:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
            raise UserError(f"an NVIDIA GPU is installed ({driver}) but torch {torch.__version__}, built for "
                            f"{build}, "
                            f"cannot use it: update the NVIDIA driver, or install a torch build for your "
                            f"CUDA "
                            f"(README: GPU drivers); or set {key}: cpu to run on the CPU")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key} is 'cuda' but no CUDA device is visible; set {key}: auto or cpu")
    return torch.device(setting)


def nvidia_driver(proc: Path = Path("/proc/driver/nvidia/version"), dev: Path = Path("/dev")) -> str | None:
    """What the kernel says of the NVIDIA driver when one is loaded (a GPU is there), else None."""
    if proc.is_file():
        match = re.search(r"Kernel Module\s+([\d.]+)", proc.read_text(errors="replace"))
        return f"driver {match.group(1)}" if match else "driver version unknown"
    if any(dev.glob("nvidia[0-9]*")):
        return "driver version unknown"
    return None


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN's bf16 convolutions then run at about twice the fp32 rate.

    Without them torch still runs bf16 on the CPU, by conversion, slower than fp32.
    """
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def use_bf16(setting: str, device: torch.device, key: str) -> bool:
    """Whether to run under bf16 autocast for a precision setting (auto, bf16, fp32) on `device`.

    `auto` is fp32 (TF32 convolutions on Ampere and later GPUs, as torch does) until evidence
    shows bf16 trains as well: measured on CPU (README: bf16 against fp32), still to be measured
    on a GPU (benchmarks/gpu_check.sh). `bf16` asks for it, and is a one-line error naming `key` on
    hardware that would only emulate it (slower than fp32, so never what was meant).
    """
    if setting != "bf16":
        return False
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        where = f"GPU {torch.cuda.get_device_name(device)} has no native bf16 (Ampere or later has)"
    elif device.type == "cpu":
        native, where = cpu_has_native_bf16(), "this CPU has neither AVX512-BF16 nor AMX"
    else:
        native, where = False, f"{device.type} has no bf16 autocast here"
    if not native:
        raise UserError(f"'{key}' is 'bf16' but {where}, so bf16 would run slower than fp32; "
                        f"set {key}: auto or fp32")
    return True


@contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 convolutions and matrix products computed in fp32 inside, not TF32.

    On Ampere and later GPUs cuDNN runs fp32 convolutions as TF32 by default (10-bit mantissa
    products): training with `precision: fp32` does, and so would translation and the Inception
    features behind FID. Evaluation runs inside this. No effect on CPUs.
    """
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved
