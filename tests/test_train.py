"""The training step against the authors' algorithm, and `cyclegan train` end to end on CPU.

Projects are built in tmp: a few toy images in the prepared format of cyclegan.data, tiny
networks (ngf 8) and 28 px crops, so a whole run takes seconds. `make_project` and
`run_train` are shared with test_resume.py and test_ddp.py.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from cyclegan import checkpoint, paths, toy_dataset
from cyclegan import device as device_module
from cyclegan.cli import main as cli_main
from cyclegan.config import config_from_dict
from cyclegan.data import MANIFEST
from cyclegan.device import cpu_has_native_bf16
from cyclegan.errors import UserError
from cyclegan.stages import train
from cyclegan.stages.train import LOSS_TERMS, TIMING_COLUMNS, CycleGAN

TINY = {
    "seed": 0,
    "data": {"dataset": "toy_horse2zebra", "load_size": 32, "crop_size": 28},
    "model": {"netG": "resnet_6blocks", "ngf": 8, "ndf": 8},
    "train": {"n_epochs": 1, "n_epochs_decay": 1, "log_every": 1, "checkpoint_every": 4,
              "device": "cpu", "threads": 1},
    "eval": {"n_samples": 2, "device": "cpu"},
}


def merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_project(root: Path, n_a: int = 12, n_b: int = 10, n_test: int = 4, **overrides) -> dict:
    """A project folder: params.yaml (TINY + overrides) and data/prepared/toy_horse2zebra.

    As `prepare` stores them: training images at load_size, test images resized to crop_size.
    """
    params = merge(TINY, overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    load, crop = params["data"]["load_size"], params["data"]["crop_size"]
    raw = root / "raw"
    if not raw.exists():
        toy_dataset.generate(raw, image_size=load, n_train_a=n_a, n_train_b=n_b, n_test=n_test, seed=2017)
    prepared = root / paths.PREPARED / "toy_horse2zebra"
    prepared.mkdir(parents=True, exist_ok=True)
    files, digest = {}, hashlib.sha256()
    for split in ("trainA", "trainB", "testA", "testB"):
        names = sorted(p.name for p in (raw / split).iterdir())
        size = load if split.startswith("train") else crop
        arrays = [np.asarray(Image.open(raw / split / n).convert("RGB").resize((size, size), Image.BICUBIC))
                  for n in names]
        np.save(prepared / f"{split}.npy", np.stack(arrays))
        files[split] = names
        digest.update(split.encode() + np.stack(arrays).tobytes())
    (prepared / MANIFEST).write_text(json.dumps({"files": files, "content_sha256": digest.hexdigest()}))
    return params


def set_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A tmp project as the working directory, with its own MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def run_train(fresh: bool = False) -> None:
    """`cyclegan train` in this process, in the current folder; a UserError comes out as is."""
    cfg = config_from_dict(yaml.safe_load(Path("params.yaml").read_text()))
    train.main(cfg, argparse.Namespace(fresh=fresh))


def read_losses(path: Path = paths.TRAIN_LOSSES) -> list[dict[str, str]]:
    """The loss plot without its timing columns."""
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def generator_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def mlflow_client():
    import mlflow

    return mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def run_id() -> str:
    return json.loads(paths.MLFLOW_RUN.read_text())["run_id"]


def images(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_model(**overrides) -> CycleGAN:
    torch.manual_seed(0)
    return CycleGAN(config_from_dict(merge(TINY, overrides)), torch.device("cpu"))


# --- the step ---------------------------------------------------------------------------------------

def authors_step(nets: dict[str, nn.Module], opt_G, opt_D, real_A, real_B, lam: float, lam_idt: float):
    """One step as cycle_gan_model.optimize_parameters computes it (LSGAN, pools still filling, so
    D sees this step's fakes), written out with plain modules and losses."""
    G_A, G_B, D_A, D_B = (nets[k] for k in ("G_A", "G_B", "D_A", "D_B"))

    def mse(prediction, target):
        return ((prediction - target) ** 2).mean()

    fake_B, fake_A = G_A(real_A), G_B(real_B)
    rec_A, rec_B = G_B(fake_B), G_A(fake_A)
    losses = {
        "idt_A": (G_A(real_B) - real_B).abs().mean() * lam * lam_idt,
        "idt_B": (G_B(real_A) - real_A).abs().mean() * lam * lam_idt,
        "G_A": mse(D_A(fake_B), 1.0), "G_B": mse(D_B(fake_A), 1.0),
        "cycle_A": (rec_A - real_A).abs().mean() * lam, "cycle_B": (rec_B - real_B).abs().mean() * lam,
    }
    for d in (D_A, D_B):
        d.requires_grad_(False)
    opt_G.zero_grad()
    sum(losses.values()).backward()
    opt_G.step()
    for d in (D_A, D_B):
        d.requires_grad_(True)
    opt_D.zero_grad()
    losses["D_A"] = (mse(D_A(real_B), 1.0) + mse(D_A(fake_B.detach()), 0.0)) * 0.5
    losses["D_B"] = (mse(D_B(real_A), 1.0) + mse(D_B(fake_A.detach()), 0.0)) * 0.5
    (losses["D_A"] + losses["D_B"]).backward()
    opt_D.step()
    return {k: v.detach() for k, v in losses.items()}


def record_gradients(opt_G: torch.optim.Optimizer, opt_D: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Copies of the gradients each optimizer step is about to apply, in order, appended per step."""
    seen: list[torch.Tensor] = []
    for opt in (opt_G, opt_D):
        def step(*args, _opt=opt, _step=opt.step, **kwargs):
            seen.extend(p.grad.clone() for group in _opt.param_groups for p in group["params"])
            return _step(*args, **kwargs)
        opt.step = step
    return seen


def assert_same_gradients(ours: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Equal up to float rounding: within 1% in norm, tensor by tensor.

    Gradients, not weights: Adam divides by the gradient's size, so the rounding noise of a
    gradient that is 0 in exact arithmetic (the bias of a convolution feeding an InstanceNorm)
    becomes an update of up to lr. A norm, not the largest entry: rounding that moves one
    activation of a 7x7 map across a ReLU's kink changes a few entries by percents. A wrong loss
    or a wrong pairing of images changes gradients by their own size.
    """
    assert len(ours) == len(expected)
    for i, (g, h) in enumerate(zip(ours, expected)):
        error, scale = float((g - h).norm()), float(h.norm())
        assert error <= 1e-2 * scale + 1e-4, f"gradient tensor {i} {tuple(h.shape)}: |diff| {error:.3g}, |g| {scale:.3g}"


def assert_same_losses(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in LOSS_TERMS:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"loss_{k}")


# Each comparison starts both sides from the same state (a deep copy: weights, optimizer states,
# pools) at a few points of a trajectory: over many steps two exact implementations drift apart,
# as the rounding differences above compound.

@pytest.mark.parametrize("batched", [True, False])
def test_step_is_the_authors_algorithm(batched):
    model = tiny_model(lambda_cycle=7.0, lambda_identity=0.3, train={"lr": 0.001, "beta1": 0.4})
    model.batch_generators = model.batch_discriminators = batched
    for step in range(3):
        real_A, real_B = images(2, seed=2 * step), images(2, seed=2 * step + 1)
        reference = copy.deepcopy(model)
        ours, theirs = record_gradients(model.opt_G, model.opt_D), record_gradients(reference.opt_G, reference.opt_D)
        expected = authors_step(reference.nets, reference.opt_G, reference.opt_D, real_A, real_B,
                                lam=7.0, lam_idt=0.3)
        assert_same_losses(model.train_step(real_A, real_B), expected)
        assert_same_gradients(ours, theirs)


def test_batched_network_calls_equal_separate_calls():
    model = tiny_model()
    assert model.batch_generators and model.batch_discriminators
    for step in range(3):
        real_A, real_B = images(1, seed=2 * step), images(1, seed=2 * step + 1)
        separate = copy.deepcopy(model)
        separate.batch_generators = separate.batch_discriminators = False
        ours, theirs = record_gradients(model.opt_G, model.opt_D), record_gradients(separate.opt_G, separate.opt_D)
        assert_same_losses(model.train_step(real_A, real_B), separate.train_step(real_A, real_B))
        assert_same_gradients(ours, theirs)


@pytest.mark.parametrize("overrides", [{"model": {"norm": "batch"}}, {"model": {"use_dropout": True}},
                                       {"lambda_identity": 0.0}])
def test_calls_stay_separate_where_batching_would_change_the_result(overrides):
    model = tiny_model(**overrides)
    assert not model.batch_generators
    assert model.batch_discriminators == (overrides.get("model", {}).get("norm") != "batch")


def test_identity_off_logs_zero_and_wgangp_adds_a_penalty():
    wgan = {"gan_mode": "wgangp", "pool_size": 0}
    losses = tiny_model(lambda_identity=0.0, train=wgan).train_step(images(2), images(2, seed=1))
    assert losses["idt_A"] == 0 and losses["idt_B"] == 0
    assert all(torch.isfinite(v) for v in losses.values())
    without = tiny_model(lambda_identity=0.0, train={**wgan, "lambda_gp": 0.0}).train_step(images(2), images(2, seed=1))
    for k in ("D_A", "D_B"):  # the same step but for the penalty, which is positive
        assert losses[k] > without[k]
    assert losses["G_A"] == without["G_A"]


def test_generator_loss_leaves_no_gradient_in_the_discriminators():
    model = tiny_model()
    seen = {}
    original = model.opt_G.step

    def record_then_step(*args, **kwargs):
        seen["D"] = [p.grad for k in ("D_A", "D_B") for p in model.nets[k].parameters()]
        return original(*args, **kwargs)

    model.opt_G.step = record_then_step
    model.train_step(images(1), images(1, seed=1))
    assert all(g is None for g in seen["D"])
    assert all(p.requires_grad for p in model.nets["D_A"].parameters())


def sum_of(losses: dict[str, torch.Tensor], terms: tuple[str, ...]) -> float:
    return float(sum(losses[k] for k in terms))


CYCLE_TERMS = ("cycle_A", "cycle_B", "idt_A", "idt_B")


@pytest.mark.parametrize("overrides, size", [
    ({}, 28),
    ({"model": {"netG": "resnet_9blocks"}}, 28),
    ({"model": {"netG": "unet_128"}}, 128),
    ({"model": {"netG": "unet_256", "use_dropout": True}}, 256),
    ({"model": {"netD": "n_layers", "n_layers_D": 2}}, 28),
    ({"model": {"netD": "pixel", "norm": "batch"}}, 28),
    ({"model": {"norm": "none", "init_type": "kaiming"}}, 28),
    ({"train": {"gan_mode": "vanilla"}, "model": {"init_type": "xavier"}}, 28),
    ({"train": {"gan_mode": "wgangp"}, "model": {"init_type": "orthogonal"}}, 28),
])
def test_each_network_and_gan_mode_trains_and_one_step_lowers_the_losses(overrides, size):
    """The losses a step returns are those before its updates, so the second step on the same
    batch reports the first step's effect: the cycle and identity terms (G's own objective
    besides the adversarial one, which D moves too) and D's loss must both have gone down."""
    model = tiny_model(**merge({"data": {"load_size": size, "crop_size": size}, "train": {"lr": 0.0002, "pool_size": 0}},
                               overrides))
    real_A, real_B = images(2, size=size), images(2, size=size, seed=1)
    before = model.train_step(real_A, real_B)
    after = model.train_step(real_A, real_B)
    assert all(torch.isfinite(v) for v in [*before.values(), *after.values()])
    assert sum_of(after, CYCLE_TERMS) < sum_of(before, CYCLE_TERMS)
    assert sum_of(after, ("D_A", "D_B")) < sum_of(before, ("D_A", "D_B"))


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no AVX512-BF16 or AMX")
def test_bf16_on_cpu_runs_under_autocast_close_to_fp32():
    fp32, bf16 = tiny_model(train={"precision": "fp32"}), tiny_model(train={"precision": "bf16"})
    assert bf16.bf16 and not fp32.bf16 and not tiny_model().bf16  # auto is fp32 on CPU
    real_A, real_B = images(2), images(2, seed=1)
    exact, mixed = fp32.train_step(real_A, real_B), bf16.train_step(real_A, real_B)
    for k in LOSS_TERMS:
        assert mixed[k].dtype == torch.float32
        assert float(mixed[k]) == pytest.approx(float(exact[k]), rel=0.05, abs=1e-3), k
    assert any(not torch.equal(mixed[k], exact[k]) for k in LOSS_TERMS)  # bf16 really ran
    again = bf16.train_step(real_A, real_B)
    assert sum_of(again, CYCLE_TERMS) < sum_of(mixed, CYCLE_TERMS)


def test_bf16_where_the_cpu_would_only_emulate_it_is_a_one_line_error(monkeypatch):
    # A CPU without AVX512-BF16 or AMX cannot be had here; the probe is what stands in for one.
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(UserError) as e:
        tiny_model(train={"precision": "bf16"})
    assert "'train.precision'" in str(e.value) and "\n" not in str(e.value)
    assert not tiny_model(train={"precision": "auto"}).bf16


# --- the stage --------------------------------------------------------------------------------------

def test_train_writes_models_plots_metrics_and_mlflow(project):
    make_project(project)
    assert cli_main(["train"]) == 0
    from cyclegan.stages.translate import load_generator

    G_A = load_generator(paths.MODELS / "G_A.pt", torch.device("cpu"))
    assert G_A(torch.zeros(1, 3, 28, 28)).shape == (1, 3, 28, 28)
    rows = read_losses()
    # 12 images per epoch (max of 12 A and 10 B), batch 1, 2 epochs; LR halves for the last one.
    assert [int(r["step"]) for r in rows] == list(range(1, 25))
    assert {float(r["lr"]) for r in rows if r["epoch"] == "1"} == {0.0002}
    assert {float(r["lr"]) for r in rows if r["epoch"] == "2"} == {0.0001}
    assert set(rows[0]) == {"step", "epoch", "lr", *(f"loss_{k}" for k in LOSS_TERMS)}
    summary = json.loads(paths.TRAIN_METRICS.read_text())
    assert summary["steps"] == 24 and summary["epochs"] == 2 and summary["identity_weight_effective"] == 5.0

    client = mlflow_client()
    run = client.get_run(run_id())
    assert run.info.status == "FINISHED"
    assert run.data.params["model.ngf"] == "8"
    history = client.get_metric_history(run.info.run_id, "loss_G_A")
    assert sorted(m.step for m in history) == list(range(1, 25))
    assert len(client.get_metric_history(run.info.run_id, "images_per_s")) == 24
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/epoch_0001.png", "samples/epoch_0002.png"]
    # Kept: the last two checkpoints (step 24 at the end of epoch 2, step 20 before it).
    assert [p.name for p in checkpoint.list_checkpoints(paths.CHECKPOINTS)] == ["step_000000020.pt",
                                                                               "step_000000024.pt"]


def test_batch_larger_than_the_dataset_fails_before_any_compute(project, monkeypatch, capsys):
    make_project(project, n_a=5, n_b=3, train={"batch_size": 6})

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(train, "CycleGAN", no_model)
    assert cli_main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cyclegan train: error: train.batch_size (6) exceeds the dataset (5 images")
    assert "\n" not in err


def test_missing_prepared_data_is_a_one_line_error(project, capsys):
    set_params(project, TINY)
    assert cli_main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no prepared dataset" in err and "dvc repro prepare" in err and "\n" not in err


def corrupt_weights_at(monkeypatch, step: int, before_step: bool) -> None:
    """Make G_A's weights NaN just before (or just after) optimisation step `step`."""
    original = CycleGAN.train_step
    calls = {"n": 0}

    def step_with_corruption(self, real_A, real_B):
        calls["n"] += 1
        if before_step and calls["n"] == step:
            self.nets["G_A"].model[1].weight.data.fill_(float("nan"))
        losses = original(self, real_A, real_B)
        if not before_step and calls["n"] == step:
            self.nets["G_A"].model[1].weight.data.fill_(float("nan"))
        return losses

    monkeypatch.setattr(CycleGAN, "train_step", step_with_corruption)


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(project, monkeypatch):
    make_project(project)
    corrupt_weights_at(monkeypatch, step=7, before_step=True)
    with pytest.raises(UserError) as e:
        run_train()
    message = str(e.value)
    assert "at step 7" in message and "loss_G_A is nan" in message and "\n" not in message
    assert "step_000000004.pt is kept" in message
    kept = checkpoint.list_checkpoints(paths.CHECKPOINTS)
    assert [p.name for p in kept] == ["step_000000004.pt"]
    state = torch.load(kept[0], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"]["nets"]["G_A"].values())
    assert not (paths.MODELS / "G_A.pt").exists()
    assert mlflow_client().get_run(run_id()).info.status == "FAILED"


def test_non_finite_weights_are_never_checkpointed(project, monkeypatch):
    make_project(project)
    # The loss of step 8 is still finite; the weights it leaves are not, at a checkpoint step.
    corrupt_weights_at(monkeypatch, step=8, before_step=False)
    with pytest.raises(UserError, match="G_A has NaN or inf weights after step 8"):
        run_train()
    assert [p.name for p in checkpoint.list_checkpoints(paths.CHECKPOINTS)] == ["step_000000004.pt"]


def test_eval_every_logs_fid_and_kid_per_epoch(project, monkeypatch):
    make_project(project, train={"eval_every": 1, "max_steps": 0})
    from cyclegan.stages import evaluate

    calls: list[tuple[tuple, tuple]] = []

    def fake_fid_kid(fake: np.ndarray, real: np.ndarray, cfg) -> dict[str, Any]:
        calls.append((fake.shape, real.shape))
        assert fake.dtype == np.uint8
        return {"fid": 10.0 + len(calls), "kid": 0.5, "kid_std": 0.1, "kid_subset_size": len(fake)}

    monkeypatch.setattr(evaluate, "fid_kid", fake_fid_kid)
    run_train()
    assert calls == [((4, 28, 28, 3), (4, 28, 28, 3))] * 4  # 2 epochs x 2 directions, the full test sets
    history = mlflow_client().get_metric_history(run_id(), "train_fid_A2B")
    assert [(m.step, m.value) for m in history] == [(1, 11.0), (2, 13.0)]


def test_cpu_training_keeps_freed_memory_instead_of_faulting_it_in_again():
    """configure_torch on CPU raises glibc's malloc thresholds: the memory of a step's freed
    tensors is reused by the next step's. By default glibc maps blocks above 32 MiB afresh each
    time (and may unmap smaller ones), so every 4 KiB page of them faults in again."""
    code = """
import resource, torch
from cyclegan.config import config_from_dict
from cyclegan.stages import train

def step():
    held = [torch.ones(12 << 20), torch.ones(3 << 20), torch.ones(12 << 20)]  # 48, 12, 48 MiB

def faults_of_steps():
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_steps()
train.configure_torch(config_from_dict({"train": {"device": "cpu"}}), torch.device("cpu"), rank=0)
# glibc before 2.35 caps the mmap threshold at 32 MiB: 48 MiB blocks would still be mapped there.
import ctypes
above_48_mib = ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 30) == 1
print(default, faults_of_steps(), int(above_48_mib))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    default, tuned, above_48_mib = map(int, out.stdout.split())
    if not above_48_mib:
        pytest.skip("this glibc caps the mmap threshold below the test's 48 MiB blocks")
    assert default > 10 * 2 * 12288 * 0.9  # the two 48 MiB blocks, every step
    assert tuned < 1000


def test_fingerprint_covers_what_changes_the_computation_and_nothing_else():
    def fp(world: int = 1, bf16: bool = False, **overrides) -> str:
        return train.fingerprint(config_from_dict(merge(TINY, overrides)), "data-hash", world, bf16)

    base = fp()
    # Where and how fast it runs, and how often it logs or saves, may change on resumption;
    # precision only through the arithmetic actually used (auto and fp32 are both fp32 on CPU).
    for overrides in ({"train": {"threads": 2}}, {"train": {"log_every": 7}}, {"train": {"checkpoint_every": 9}},
                      {"train": {"max_steps": 3}}, {"train": {"winograd": False}}, {"train": {"precision": "fp32"}},
                      {"train": {"keep_checkpoints": 5}}, {"train": {"eval_every": 1}}):
        assert fp(**overrides) == base, overrides
    for changed in (fp(bf16=True), fp(world=2), fp(lambda_cycle=5.0), fp(seed=1), fp(train={"lr": 0.001}),
                    fp(model={"ngf": 16}), fp(data={"crop_size": 24}),
                    train.fingerprint(config_from_dict(TINY), "other-data", 1, False)):
        assert changed != base
