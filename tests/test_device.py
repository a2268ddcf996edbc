"""Device settings: a GPU torch cannot use, true fp32 in evaluation, strict deterministic mode,
and the collective timeout of multi-process training. Each runs on CPU."""
from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import torch

from cyclegan import device, distributed, fid_kid, inception, runtime
from cyclegan.config import config_from_dict
from cyclegan.errors import UserError
from helpers import TRAIN_PARAMS, merge

PROC_VERSION = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.57.02  Tue Jul 13 16:14:05 UTC 2021\n"
                "GCC version:  gcc version 9.3.0 (Ubuntu 9.3.0-17ubuntu1~20.04)\n")


def test_the_nvidia_driver_is_read_from_the_kernel(tmp_path):
    proc = tmp_path / "version"
    assert device.nvidia_driver(proc, tmp_path) is None  # no driver, no device node: no GPU
    (tmp_path / "nvidia0").touch()
    assert device.nvidia_driver(proc, tmp_path) == "driver version unknown"
    proc.write_text(PROC_VERSION)
    assert device.nvidia_driver(proc, tmp_path) == "driver 470.57.02"


@pytest.mark.parametrize("setting", ["auto", "cuda"])
def test_a_gpu_torch_cannot_use_is_one_line_not_a_silent_cpu_run(monkeypatch, setting):
    monkeypatch.setattr(device, "nvidia_driver", lambda: "driver 470.57.02")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as e:
        device.resolve_device(setting, "train.device")
    message = str(e.value)
    assert "driver 470.57.02" in message and "update the NVIDIA driver" in message
    assert "set train.device: cpu" in message and "\n" not in message
    assert device.resolve_device("cpu", "train.device") == torch.device("cpu")


def test_without_an_nvidia_gpu_auto_is_the_cpu(monkeypatch):
    monkeypatch.setattr(device, "nvidia_driver", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve_device("auto", "eval.device") == torch.device("cpu")
    with pytest.raises(UserError, match="eval.device is 'cuda' but no CUDA device is visible"):
        device.resolve_device("cuda", "eval.device")


def test_exact_fp32_turns_tf32_off_inside_and_restores_it():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with pytest.raises(RuntimeError, match="inside"):
        with device.exact_fp32():
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
            raise RuntimeError("inside")
    assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_inception_features_are_extracted_in_true_fp32(monkeypatch):
    import torch_fidelity.utils

    seen = []

    def extract(*args, **kwargs):
        seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
        return {inception.POOL_LAYER: torch.zeros(len(kwargs["input1"]), 2048)}

    monkeypatch.setattr(torch_fidelity.utils, "extract_featuresdict_from_input_id_cached", extract)
    scorer = fid_kid.InceptionScorer(weights=None, device="cpu", _extractor="the network, not needed here")
    scorer.features(np.zeros((2, 8, 8, 3), np.uint8), cache=False)
    assert seen == [("ieee", "ieee")]


def test_deterministic_mode_is_strict_and_the_cpu_step_passes_it():
    cfg = config_from_dict(merge(TRAIN_PARAMS, {"train": {"deterministic": True, "pool_size": 0}}))
    try:
        runtime.configure_torch(cfg, torch.device("cpu"), rank=0)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        # Every kernel of a training step has a deterministic version on CPU.
        model = runtime.build_model(cfg, torch.device("cpu"), distributed.Distributed())
        real = torch.rand(2, 1, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
        losses = model.train_step(real[0], real[1])
        assert all(torch.isfinite(v) for v in losses.values())
    finally:
        torch.use_deterministic_algorithms(False)


def test_ranks_wait_for_rank_0_s_evaluation_longer_than_nccl_s_default(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    ddp, dev = distributed.join("cpu")
    assert (ddp.rank, ddp.world, dev.type, seen["backend"]) == (1, 2, "cpu", "gloo")
    assert seen["timeout"] >= timedelta(hours=1)  # NCCL's default is 10 minutes


@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_auto_precision_is_fp32_until_bf16_is_shown_to_train_as_well(where):
    # README, "bf16 against fp32": no measured evidence on a GPU yet, so auto is fp32 everywhere.
    assert device.use_bf16("auto", torch.device(where), "train.precision") is False
    assert device.use_bf16("fp32", torch.device(where), "train.precision") is False
