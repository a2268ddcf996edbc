"""The GPU path: each precision and option trains, and GPU results agree with the CPU's.

Marked `cuda`: skipped, with the reason, where torch sees no CUDA device (CI, the 2-core
machines). `pytest -m cuda` runs just these; benchmarks/gpu_check.sh runs them first on a GPU.
Tolerances: bf16 losses within 5% of fp32 on the same batch (bf16 keeps 8 bits of mantissa);
compiled within 1e-3 of eager (fusion reorders float sums); CPU and GPU translations within 2
of 255 (TF32-free fp32 on both, different kernels); FID within 0.5% between devices.
"""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

from cyclegan import fid_kid, inception
from cyclegan.config import config_from_dict
from cyclegan.device import exact_fp32
from cyclegan.distributed import Distributed
from cyclegan.generator_file import translate_array
from cyclegan.model import LOSS_TERMS, CycleGAN
from cyclegan.runtime import build_model, configure_torch
from helpers import TRAIN_PARAMS, merge

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")]

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
SIZE = 32
CYCLE_TERMS = ("cycle_A", "cycle_B", "idt_A", "idt_B")


def params(**train) -> dict:
    return merge(TRAIN_PARAMS, {"data": {"load_size": SIZE, "crop_size": SIZE},
                                "train": {"device": "cuda", "pool_size": 0, "lr": 0.0002, **train}})


def model(device: torch.device = CUDA, **train) -> CycleGAN:
    cfg = config_from_dict(params(**train))
    configure_torch(cfg, device, rank=0)
    return build_model(cfg, device, Distributed())


def batch(device: torch.device, memory_format=torch.contiguous_format, seed: int = 0):
    x = torch.rand(2, 2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return [t.to(device).contiguous(memory_format=memory_format) for t in x]


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


@pytest.mark.parametrize("train", [{"precision": "fp32"}, {"precision": "bf16"}, {"channels_last": True},
                                   {"compile": True}, {"deterministic": True}],
                         ids=["fp32", "bf16", "channels_last", "compile", "deterministic"])
def test_one_step_per_precision_and_option_is_finite_and_lowers_the_losses(train):
    m = model(**train)
    real_A, real_B = batch(CUDA, m.memory_format)
    before = m.train_step(real_A, real_B)
    after = m.train_step(real_A, real_B)
    values = [float(v) for v in [*before.values(), *after.values()]]
    assert all(np.isfinite(values))
    assert sum(float(after[k]) for k in CYCLE_TERMS) < sum(float(before[k]) for k in CYCLE_TERMS)
    assert float(after["D_A"] + after["D_B"]) < float(before["D_A"] + before["D_B"])


def test_bf16_losses_are_within_5_percent_of_fp32():
    fp32, bf16 = model(precision="fp32"), model(precision="bf16")
    assert bf16.bf16 and not fp32.bf16
    real_A, real_B = batch(CUDA)
    exact, mixed = fp32.train_step(real_A, real_B), bf16.train_step(real_A, real_B)
    for k in LOSS_TERMS:
        assert float(mixed[k]) == pytest.approx(float(exact[k]), rel=0.05, abs=1e-3), k


def test_compiled_step_equals_eager_within_1e_3():
    eager, compiled = model(precision="fp32"), model(precision="fp32", compile=True)
    real_A, real_B = batch(CUDA)
    for _ in range(2):
        a, b = eager.train_step(real_A, real_B), compiled.train_step(real_A, real_B)
        for k in LOSS_TERMS:
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-3, abs=1e-5), k


def test_deterministic_mode_gives_bit_identical_weights_twice():
    def run() -> dict[str, torch.Tensor]:
        m = model(precision="fp32", deterministic=True, pool_size=4)
        for seed in range(3):
            m.train_step(*batch(CUDA, seed=seed))
        return {f"{n}.{k}": v.detach().cpu().clone() for n, net in m.nets.items() for k, v in net.state_dict().items()}

    first, second = run(), run()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def _saved(m: CycleGAN) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    return buffer


def _weights(m: CycleGAN) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().float().cpu() for n, net in m.nets.items() for k, v in net.state_dict().items()}


def test_a_cuda_checkpoint_resumes_on_cpu_and_a_cpu_one_on_cuda():
    cfg = config_from_dict(params(precision="fp32", channels_last=True))
    gpu = build_model(cfg, CUDA, Distributed())
    gpu.train_step(*batch(CUDA, gpu.memory_format))
    cpu = CycleGAN(cfg, CPU)  # contiguous weights, fused CPU Adam
    cpu.load_state_dict(torch.load(_saved(gpu), map_location="cpu", weights_only=True))
    continued_on_gpu = copy.deepcopy(gpu)
    cpu.train_step(*batch(CPU, seed=1))
    continued_on_gpu.train_step(*batch(CUDA, gpu.memory_format, seed=1))
    # atol 2.5 lr: Adam turns the rounding noise of gradients that are 0 in exact arithmetic (the
    # biases feeding InstanceNorm) into updates of up to lr (see helpers.assert_same_gradients).
    for k, v in _weights(continued_on_gpu).items():
        torch.testing.assert_close(_weights(cpu)[k], v, rtol=1e-3, atol=5e-4, msg=k)

    back = build_model(cfg, CUDA, Distributed())  # channels_last on CUDA: the fused kernel checks layouts
    back.load_state_dict(torch.load(_saved(cpu), map_location="cuda", weights_only=True))
    back.train_step(*batch(CUDA, back.memory_format, seed=2))
    cpu.train_step(*batch(CPU, seed=2))
    for k, v in _weights(cpu).items():
        torch.testing.assert_close(_weights(back)[k], v, rtol=1e-3, atol=1e-3, msg=k)


def test_translation_and_fid_on_cuda_equal_the_cpu_s(inception_cache):
    cpu_model = CycleGAN(config_from_dict(params(precision="fp32")), CPU)
    G = cpu_model.nets["G_A"].eval()
    images = (np.random.default_rng(0).random((6, SIZE, SIZE, 3)) * 255).astype(np.uint8)
    with exact_fp32():  # as the translate stage runs
        on_cpu = translate_array(G, images, 4, CPU)
        on_gpu = translate_array(copy.deepcopy(G).to(CUDA), images, 4, CUDA)
    assert np.abs(on_cpu.astype(int) - on_gpu.astype(int)).max() <= 2

    weights = inception.resolve("auto")
    real = (np.random.default_rng(1).random((8, 64, 64, 3)) * 255).astype(np.uint8)
    fake = (np.random.default_rng(2).random((8, 64, 64, 3)) * 255).astype(np.uint8)
    scores = {d: fid_kid.InceptionScorer(weights, d).fid_kid(fake, real, cache_real=False) for d in ("cpu", "cuda")}
    assert scores["cuda"]["fid"] == pytest.approx(scores["cpu"]["fid"], rel=5e-3)
