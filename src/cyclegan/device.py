"""Turn device settings into torch terms, shared by every stage: which device, which precision."""
from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(setting: str, key: str) -> torch.device:
    """`auto` picks CUDA when visible; asking for CUDA without one is a one-line error naming `key`."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key} is 'cuda' but no CUDA device is visible; set {key}: auto or cpu")
    return torch.device(setting)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN's bf16 convolutions then run at about twice the fp32 rate.

    Without them torch still runs bf16 on the CPU, by conversion, slower than fp32.
    """
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def use_bf16(setting: str, device: torch.device, key: str) -> bool:
    """Whether to run under bf16 autocast for a precision setting (auto, bf16, fp32) on `device`.

    `auto` means bf16 wherever the hardware computes it natively except on CPU, whose fp32
    results stay comparable across machines; `bf16` insists, and is a one-line error naming
    `key` on hardware that would only emulate it (slower than fp32, so never what was meant).
    """
    if setting == "fp32":
        return False
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        where = f"GPU {torch.cuda.get_device_name(device)} has no native bf16 (Ampere or later has)"
    elif device.type == "cpu":
        if setting == "auto":
            return False
        native, where = cpu_has_native_bf16(), "this CPU has neither AVX512-BF16 nor AMX"
    else:
        native, where = False, f"{device.type} has no bf16 autocast here"
    if native:
        return True
    if setting == "bf16":
        raise UserError(f"'{key}' is 'bf16' but {where}, so bf16 would run slower than fp32; "
                        f"set {key}: auto or fp32")
    return False
