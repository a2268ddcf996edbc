"""The training step against the authors' algorithm, and `cyclegan train` end to end on CPU.

Projects are built in tmp (helpers.make_project): a few toy images in the prepared format of
cyclegan.prepared_data, tiny networks (ngf 8) and 28 px crops, so a whole run takes seconds.
"""
from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cyclegan import checkpoint, paths, tracking
from cyclegan import device as device_module
from cyclegan.cli import main as cli_main
from cyclegan.config import config_from_dict
from cyclegan.device import cpu_has_native_bf16
from cyclegan.distributed import Distributed
from cyclegan.errors import UserError
from cyclegan.generator_file import load_generator
from cyclegan.model import LOSS_TERMS, CycleGAN
from cyclegan.runtime import build_model
from cyclegan.stages import train
from helpers import (TRAIN_PARAMS, run_checkpoints, assert_same_gradients, enter_project, make_project, merge, mlflow_client,
                     read_losses, record_gradients, run_id, run_train, set_params)


def images(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_model(**overrides) -> CycleGAN:
    """CycleGAN as `train` builds it from TRAIN_PARAMS + overrides, on CPU (bf16 from train.precision)."""
    torch.manual_seed(0)
    return build_model(config_from_dict(merge(TRAIN_PARAMS, overrides)), torch.device("cpu"), Distributed())


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


def assert_same_losses(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in LOSS_TERMS:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"loss_{k}")


# Each comparison starts both sides from the same state (a deep copy: weights, optimizer states,
# pools) at a few points of a trajectory: over many steps two exact implementations drift apart,
# as the rounding differences above compound.

@pytest.mark.parametrize("batched", [True, False])
def test_step_is_the_authors_algorithm(batched):
    # An identity weight below 1 (2 * 0.3): nothing may treat the weight as on/off at 1.
    model = tiny_model(lambda_cycle=2.0, lambda_identity=0.3, train={"lr": 0.001, "beta1": 0.4})
    model.batch_generators = model.batch_discriminators = batched
    for step in range(3):
        real_A, real_B = images(2, seed=2 * step), images(2, seed=2 * step + 1)
        reference = copy.deepcopy(model)
        ours, theirs = record_gradients(model.opt_G, model.opt_D), record_gradients(reference.opt_G, reference.opt_D)
        expected = authors_step(reference.nets, reference.opt_G, reference.opt_D, real_A, real_B,
                                lam=2.0, lam_idt=0.3)
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


def test_identity_off_skips_the_identity_translations():
    # lambda_identity 0 is the usual ablation: G_A(b) and G_B(a) would cost a third of the
    # generator work for a loss weighted 0 (and, with dropout, shift the random stream).
    model = tiny_model(lambda_identity=0.0)
    calls = {"G_A": [], "G_B": []}
    for name in calls:
        model.nets[name].register_forward_hook(lambda net, args, out, name=name: calls[name].append(args[0].shape[0]))
    model.train_step(images(2), images(2, seed=1))
    assert calls == {"G_A": [2, 2], "G_B": [2, 2]}  # G_A(real_A), G_A(fake_A); G_B(fake_B), G_B(real_B)


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


# The GPU options run on CPU too, so that CI exercises them (tests/test_cuda.py: on a GPU).

def test_channels_last_trains_as_the_contiguous_layout_does():
    ours, contiguous = tiny_model(train={"channels_last": True, "pool_size": 0}), tiny_model(train={"pool_size": 0})
    assert ours.memory_format == torch.channels_last
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in ours.nets["G_A"].parameters() if p.dim() == 4)
    # As in test_batched_network_calls_equal_separate_calls: the same losses, and gradients equal
    # up to rounding (the first step's updates, which Adam scales by the gradients' size, would
    # turn rounding noise into differences of up to lr).
    ours_grads, their_grads = record_gradients(ours.opt_G, ours.opt_D), record_gradients(contiguous.opt_G, contiguous.opt_D)
    real_A, real_B = images(2), images(2, seed=1)
    a = ours.train_step(real_A.contiguous(memory_format=torch.channels_last),
                        real_B.contiguous(memory_format=torch.channels_last))
    assert_same_losses(a, contiguous.train_step(real_A, real_B))
    assert_same_gradients(ours_grads, their_grads)


@pytest.mark.long
def test_compiled_networks_train_as_eager_ones():
    """torch.compile on CPU (inductor, built with the machine's C++ compiler): the step compiles
    for a minute or two (three on 2 cores with a cold compiler cache, as in CI: the `long` tier),
    then equals eager up to float rounding."""
    compiled, eager = tiny_model(train={"compile": True, "pool_size": 0}), tiny_model(train={"pool_size": 0})
    assert all(type(net).__name__ == "OptimizedModule" for net in compiled._run.values())
    ours_grads, their_grads = record_gradients(compiled.opt_G, compiled.opt_D), record_gradients(eager.opt_G, eager.opt_D)
    real_A, real_B = images(2), images(2, seed=1)
    assert_same_losses(compiled.train_step(real_A, real_B), eager.train_step(real_A, real_B))
    assert_same_gradients(ours_grads, their_grads)


# --- the stage --------------------------------------------------------------------------------------

def test_train_writes_models_plots_metrics_and_mlflow(trained, monkeypatch, tmp_path):
    # `cyclegan train` of make_project's defaults, run once for this file and test_resume.py.
    assert trained.exit_code == 0
    enter_project(monkeypatch, trained.root)
    G_A = load_generator(paths.GENERATORS["G_A"], torch.device("cpu"))
    assert G_A(torch.zeros(1, 3, 28, 28)).shape == (1, 3, 28, 28)
    rows = read_losses()
    # 12 images per epoch (max of 12 A and 10 B), batch 1, 2 epochs; LR halves for the last one.
    assert [int(r["step"]) for r in rows] == list(range(1, 25))
    assert {float(r["lr"]) for r in rows if r["epoch"] == "1"} == {0.0002}
    assert {float(r["lr"]) for r in rows if r["epoch"] == "2"} == {0.0001}
    assert set(rows[0]) == {"step", "epoch", "lr", *(f"loss_{k}" for k in LOSS_TERMS)}
    # metrics/train.json holds what experiments are compared by, the final losses (the mean of the
    # last 5 logged rows), and nothing that depends on the machine or the clock.
    final = json.loads(paths.TRAIN_METRICS.read_text())
    assert set(final) == {f"loss_{k}" for k in LOSS_TERMS}
    assert final["loss_G_A"] == pytest.approx(np.mean([float(r["loss_G_A"]) for r in rows[-5:]]))
    assert paths.TRAIN_EVAL.read_text() == "epoch,fid_A2B,fid_B2A,kid_A2B,kid_B2A\n"  # eval_every: 0

    client = mlflow_client()
    run = client.get_run(run_id())
    assert run.info.status == "FINISHED"
    assert run.data.params["model.ngf"] == "8" and run.data.params["identity_weight_effective"] == "5.0"
    assert run.data.metrics["train_seconds_this_run"] > 0 and run.data.metrics["images_per_s_this_run"] > 0
    assert run.data.tags["generators_sha256"] == tracking.generators_sha256()
    history = client.get_metric_history(run.info.run_id, "loss_G_A")
    assert sorted(m.step for m in history) == list(range(1, 25))
    assert len(client.get_metric_history(run.info.run_id, "images_per_s")) == 24
    # A sample grid per direction and epoch: rows input, translation, reconstruction, identity of
    # eval.n_samples (2) test images, 28 px tiles with 2 px of padding.
    folders = [(a.path, a.is_dir) for a in client.list_artifacts(run.info.run_id, "samples")]
    assert folders == [("samples/A2B", True), ("samples/B2A", True)]
    for direction in ("A2B", "B2A"):
        grids = [a.path for a in client.list_artifacts(run.info.run_id, f"samples/{direction}")]
        assert grids == [f"samples/{direction}/epoch_0001.png", f"samples/{direction}/epoch_0002.png"]
    grid = client.download_artifacts(run.info.run_id, "samples/B2A/epoch_0002.png", str(tmp_path))
    with Image.open(grid) as im:
        assert im.size == (2 + 2 * 30, 2 + 4 * 30)
    # Kept: the last two checkpoints (step 24 at the end of epoch 2, step 20 before it).
    assert [p.name for p in run_checkpoints()] == ["step_000000020.pt",
                                                                               "step_000000024.pt"]


def test_no_sample_grids_with_n_samples_0(project):
    make_project(project, n_a=4, n_b=4, train={"n_epochs_decay": 0}, eval={"n_samples": 0})
    run_train()
    assert read_losses()[-1]["step"] == "4"  # an epoch ended ...
    client = mlflow_client()
    assert client.get_run(run_id()).info.status == "FINISHED"
    assert client.list_artifacts(run_id(), "samples") == []  # ... and logged no grid


def test_batch_larger_than_the_dataset_fails_before_any_compute(project, monkeypatch, capsys):
    make_project(project, n_a=5, n_b=3, train={"batch_size": 6})

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(train, "build_model", no_model)
    assert cli_main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cyclegan train: error: train.batch_size (6) exceeds the dataset (5 images")
    assert "\n" not in err


def test_missing_prepared_data_is_a_one_line_error(project, capsys):
    set_params(project, TRAIN_PARAMS)
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
    kept = run_checkpoints()
    assert [p.name for p in kept] == ["step_000000004.pt"]
    state = torch.load(kept[0], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"]["nets"]["G_A"].values())
    assert not (paths.GENERATORS["G_A"]).exists()
    assert mlflow_client().get_run(run_id()).info.status == "FAILED"


def test_non_finite_weights_are_never_checkpointed(project, monkeypatch):
    make_project(project)
    # The loss of step 8 is still finite; the weights it leaves are not, at a checkpoint step.
    corrupt_weights_at(monkeypatch, step=8, before_step=False)
    with pytest.raises(UserError, match="G_A has NaN or inf weights after step 8"):
        run_train()
    assert [p.name for p in run_checkpoints()] == ["step_000000004.pt"]


def test_eval_every_logs_fid_and_kid_per_epoch(project, monkeypatch):
    make_project(project, train={"eval_every": 1, "max_steps": 0})
    calls: list[tuple[tuple, tuple]] = []

    def fake_fid_kid(fake: np.ndarray, real: np.ndarray, cfg) -> dict[str, Any]:
        calls.append((fake.shape, real.shape))
        assert fake.dtype == np.uint8
        return {"fid": 10.0 + len(calls), "kid": 0.5, "kid_std": 0.1, "kid_subset_size": len(fake)}

    monkeypatch.setattr(train, "fid_kid", fake_fid_kid)  # the name train looks up
    run_train()
    assert calls == [((4, 28, 28, 3), (4, 28, 28, 3))] * 4  # 2 epochs x 2 directions, the full test sets
    history = mlflow_client().get_metric_history(run_id(), "train_fid_A2B")
    assert [(m.step, m.value) for m in history] == [(1, 11.0), (2, 13.0)]
    # The same scores, in the DVC plot: A2B then B2A each epoch.
    assert paths.TRAIN_EVAL.read_text().splitlines() == [
        "epoch,fid_A2B,fid_B2A,kid_A2B,kid_B2A", "1,11.0,12.0,0.5,0.5", "2,13.0,14.0,0.5,0.5"]


def test_fingerprint_covers_what_defines_the_run_and_nothing_else():
    def fp(**overrides) -> str:
        return checkpoint.fingerprint(config_from_dict(merge(TRAIN_PARAMS, overrides)), "data-hash", "code-hash")

    base = fp()
    # Where and how it runs, and how often it logs or saves, may change on resumption: the memory
    # layout, compilation and deterministic kernels change the rounding, not the model trained.
    for overrides in ({"train": {"threads": 2}}, {"train": {"log_every": 7}}, {"train": {"checkpoint_every": 9}},
                      {"train": {"max_steps": 3}},
                      {"train": {"channels_last": True}}, {"train": {"deterministic": True}},
                      {"train": {"compile": True}}, {"train": {"device": "cuda"}},
                      {"train": {"keep_checkpoints": 5}}, {"train": {"eval_every": 1}}):
        assert fp(**overrides) == base, overrides
    # The precision setting is in it (bf16 is other arithmetic), not what `auto` resolves to.
    for changed in (fp(train={"precision": "bf16"}), fp(train={"precision": "fp32"}), fp(lambda_cycle=5.0),
                    fp(lambda_identity=0.0), fp(seed=1), fp(train={"lr": 0.001}),
                    fp(train={"batch_size": 2}), fp(train={"pool_size": 3}), fp(model={"ngf": 16}),
                    fp(data={"crop_size": 24}), fp(data={"no_flip": True}),
                    checkpoint.fingerprint(config_from_dict(TRAIN_PARAMS), "other-data", "code-hash"),
                    checkpoint.fingerprint(config_from_dict(TRAIN_PARAMS), "data-hash", "other-code")):
        assert changed != base
    # Generators to start from count by content, not by name: the same file renamed is the same run.
    def started_from(path: str, sha256: str) -> str:
        cfg = config_from_dict(merge(TRAIN_PARAMS, {"train": {"init_from": {"G_A": path}}}))
        return checkpoint.fingerprint(cfg, "data-hash", "code-hash", {"G_A": sha256})

    assert started_from("models/init/a.safetensors", "1" * 64) == started_from("models/init/b.safetensors", "1" * 64)
    assert started_from("models/init/a.safetensors", "1" * 64) not in (base, started_from("models/init/a.safetensors", "2" * 64))
