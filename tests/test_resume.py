"""Checkpoints and resumption: a killed run, resumed, ends exactly as an uninterrupted one.

"Exactly" is bit for bit on CPU: the same per-step losses in metrics/train_losses.csv (timing
columns aside) and torch.equal generator weights.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cyclegan import checkpoint, code_closure, paths
from cyclegan.config import config_from_dict
from cyclegan.prepared_data import MANIFEST
from cyclegan.errors import UserError
from cyclegan.model import CycleGAN
from cyclegan.training_state import load_shared_state, shared_state
from helpers import (TRAIN_PARAMS, enter_project, generator_weights, make_project, merge, mlflow_client,
                     project_env, read_losses, run_checkpoints, run_dir, run_id, run_ids, run_train, set_params)

# 2 epochs of 12 steps; checkpoints every 3 steps, the last 2 kept.
PARAMS = {"train": {"checkpoint_every": 3}}


def outputs(root: Path) -> tuple[list[dict[str, str]], dict[str, dict[str, torch.Tensor]]]:
    return (read_losses(root / paths.TRAIN_LOSSES),
            {g: generator_weights(root / paths.GENERATORS[g]) for g in ("G_A", "G_B")})


def assert_same_run(got, expected) -> None:
    (rows, weights), (rows_expected, weights_expected) = got, expected
    assert len(rows) == 24
    assert rows == rows_expected
    for g in weights_expected:
        assert weights[g].keys() == weights_expected[g].keys()
        for k in weights_expected[g]:
            assert torch.equal(weights[g][k], weights_expected[g][k]), f"{g}.{k}"


@pytest.fixture(scope="module")
def uninterrupted(trained):
    """The reference: the session's run from start to end, in this process (conftest.trained).

    It checkpoints every 4 steps, the runs here every 3: checkpoint_every is not part of the
    fingerprint, and writing a checkpoint must not change the training either.
    """
    assert trained.exit_code == 0
    return outputs(trained.root)


def prepared_hash() -> str:
    return json.loads((paths.PREPARED / "toy_horse2zebra" / MANIFEST).read_text())["content_sha256"]


def newest_step(root: Path) -> int:
    return max(checkpoint.newest_step(root / run_dir(root)), 0)


def cyclegan_train(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cyclegan", "train", *args], cwd=root, env=project_env(root),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_run_killed_mid_training_resumes_to_the_bit(tmp_path, uninterrupted):
    make_project(tmp_path, **PARAMS)
    proc = cyclegan_train(tmp_path)
    deadline = time.monotonic() + 120
    while newest_step(tmp_path) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # into the steps after the checkpoint, whose work the kill throws away
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    killed_at = newest_step(tmp_path)
    assert 6 <= killed_at < 24
    assert not (tmp_path / paths.GENERATORS["G_A"]).exists()
    first_run = run_id(tmp_path)

    proc = cyclegan_train(tmp_path)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    # 12 steps an epoch: the line names the epoch (1-based) and step it continues from.
    assert (f"resuming from {run_dir(tmp_path) / f'step_{killed_at:09d}.pt'} "
            f"(epoch {killed_at // 12 + 1}, step {killed_at})") in log
    assert_same_run(outputs(tmp_path), uninterrupted)

    assert run_ids(tmp_path) == [first_run]  # the same MLflow run, reattached, no other
    client = mlflow_client(tmp_path)
    assert client.get_run(first_run).info.status == "FINISHED"
    # Each step once: the steps logged before the kill and repeated after it are not logged twice.
    steps = sorted(m.step for m in client.get_metric_history(first_run, "loss_G_A"))
    assert steps == list(range(1, 25))


def test_stopped_run_continues_exactly_and_keeps_its_mlflow_run(project, uninterrupted):
    # max_steps is not part of the fingerprint: raising it continues the run.
    params = make_project(project, **merge(PARAMS, {"train": {"max_steps": 10}}))
    run_train()
    first_run = run_id()
    assert [r["step"] for r in read_losses()] == [str(s) for s in range(1, 11)]
    set_params(project, merge(params, {"train": {"max_steps": 0}}))
    run_train()
    assert_same_run(outputs(project), uninterrupted)
    assert run_ids() == [first_run]


class _RunsCode:
    """A pickle that, when unpickled, creates the file it names."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_holding_code_is_skipped_without_running_it(tmp_path, capsys):
    folder, marker = tmp_path / "run", tmp_path / "code_ran"
    folder.mkdir()
    torch.save({"step": 5, "evil": _RunsCode(marker)}, folder / "step_000000005.pt")
    assert checkpoint.load_latest(folder) is None  # skipped as unreadable: weights only
    assert not marker.exists()
    assert "skipping unreadable checkpoint" in capsys.readouterr().out


def test_checkpoint_holds_the_full_state_and_loads_weights_only(project):
    make_project(project, **merge(PARAMS, {"train": {"max_steps": 10}}))
    params = config_from_dict(yaml.safe_load(Path("params.yaml").read_text()))
    fingerprint = checkpoint.fingerprint(params, prepared_hash(), code_closure.sources_sha256("train"))
    folder = checkpoint.run_folder(paths.CHECKPOINTS, fingerprint)
    stale = folder / ".step_000000003.pt.x1y2.tmp"  # left by a killed write
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    run_train()
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["step_000000009.pt", "step_000000010.pt"]  # keep_checkpoints: 2, no temp files

    state = torch.load(folder / "step_000000010.pt", weights_only=True)
    assert state["step"] == 10 and state["epoch"] == 0 and state["position"] == 10
    assert state["execution"] == {"world": 1, "device": "cpu", "bf16": False, "channels_last": False,
                                  "deterministic": False, "compile": False}
    assert state["mlflow_run_id"] == run_id()
    assert len(state["history"]) == 10 and state["config"]["train"]["max_steps"] == 10
    model = state["model"]
    assert set(model) == {"nets", "opt_G", "opt_D", "sched_G", "sched_D"}
    assert set(model["nets"]) == {"G_A", "G_B", "D_A", "D_B"}
    assert model["opt_G"]["state"] and model["sched_G"]["last_epoch"] == 0
    rank = state["ranks"][0]
    assert rank["pool_A"]["images"].shape == (10, 3, 28, 28) and rank["pool_B"]["rng"]
    assert set(rank["rng"]) == {"python", "numpy", "torch", "cuda"}


def test_other_params_start_in_their_own_folder_and_keep_the_others(project, capsys):
    params = make_project(project, **merge(PARAMS, {"train": {"max_steps": 4}}))
    run_train()
    first_run, first_losses, first_dir = run_id(), read_losses(), run_dir()
    first_files = {p: p.read_bytes() for p in first_dir.iterdir()}
    set_params(project, merge(params, {"lambda_cycle": 5.0}))
    capsys.readouterr()
    run_train()
    out = capsys.readouterr().out
    assert "resuming" not in out
    losses = read_losses()
    assert [r["step"] for r in losses] == ["1", "2", "3", "4"]
    assert losses[0]["loss_G_A"] == first_losses[0]["loss_G_A"]  # the same start ...
    assert losses[0]["loss_cycle_A"] != first_losses[0]["loss_cycle_A"]  # ... with the new weight
    assert run_id() != first_run
    # The first run's training state is untouched, beside the new run's.
    assert {p: p.read_bytes() for p in first_dir.iterdir()} == first_files
    (new_dir,) = [d for d in paths.CHECKPOINTS.iterdir() if d.is_dir() and d != first_dir]  # not the .lock files
    assert f"cyclegan train: starting afresh in {new_dir}; {paths.CHECKPOINTS} also holds 1 other run (" in out
    assert "kept: delete what you no longer need" in out
    state = torch.load(new_dir / "step_000000004.pt", weights_only=True)
    assert state["config"]["lambda_cycle"] == 5.0


def test_checkpoints_of_an_earlier_version_are_kept_not_resumed(project, capsys):
    make_project(project, **merge(PARAMS, {"train": {"max_steps": 4}}))
    legacy = paths.CHECKPOINTS / "step_000000004.pt"  # the flat layout of earlier versions
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"an old checkpoint")
    run_train()
    out = capsys.readouterr().out
    # The note's wording and sizes: test_a_new_run_says_what_else_the_checkpoints_folder_holds.
    assert f"starting afresh in {run_dir()}; {paths.CHECKPOINTS} also holds checkpoints of an earlier version" in out
    assert "resuming" not in out
    assert legacy.read_bytes() == b"an old checkpoint"


def test_a_new_run_says_what_else_the_checkpoints_folder_holds(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "step_000000004.pt").write_bytes(bytes(3 * 2**20))  # an earlier version's, alone
    assert checkpoint.open_run(root, "0123456789abcdef", {"world": 1}) is None
    note = (f"cyclegan train: starting afresh in {root / '0123456789abcdef'}; {root} also holds checkpoints "
            f"of "
            f"an earlier version (3 MiB), kept: delete what you no longer need\n")
    assert capsys.readouterr().out == note
    (root / "0000000000000000").mkdir()  # a folder without checkpoints is no run
    for n, other in enumerate(("fedcba9876543210", "ffffffffffffffff"), start=1):
        (root / other).mkdir()
        (root / other / "step_000000008.pt").write_bytes(bytes(2**20))
        checkpoint.open_run(root, "0123456789abcdef", {"world": 1})
        runs = "1 other run" if n == 1 else "2 other runs"
        assert (f"also holds {runs} and checkpoints of an earlier version ({3 + n} MiB), kept"
                in capsys.readouterr().out)


def test_another_number_of_processes_stops_with_one_line(project):
    params = make_project(project, **merge(PARAMS, {"train": {"max_steps": 3}}))
    run_train()
    newest = run_dir() / "step_000000003.pt"
    state = torch.load(newest, weights_only=True)
    state["execution"]["world"] = 2  # as a 2-process torchrun job writes it
    torch.save(state, newest)
    set_params(project, merge(params, {"train": {"max_steps": 6}}))
    with pytest.raises(UserError) as e:
        run_train()
    message = str(e.value)
    assert str(newest) in message and "2 training processes" in message and "--fresh" in message
    assert "\n" not in message
    assert newest.exists()


def test_another_precision_setting_is_another_run(project, capsys):
    """`dvc exp run -S train.precision=bf16` asks for a model trained in bf16: a finished fp32
    run must not be handed back for it (on CPU auto is fp32 too, but it is another setting)."""
    params = make_project(project, **merge(PARAMS, {"train": {"max_steps": 3, "precision": "fp32"}}))
    run_train()
    set_params(project, merge(params, {"train": {"precision": "auto"}}))
    capsys.readouterr()
    run_train()
    out = capsys.readouterr().out
    assert "resuming" not in out and "also holds 1 other run" in out
    assert [r["step"] for r in read_losses()] == ["1", "2", "3"]


def test_a_run_resumes_under_other_execution_settings_and_says_so(project, capsys):
    params = make_project(project, **merge(PARAMS, {"train": {"max_steps": 3}}))
    run_train()
    set_params(project, merge(params, {"train": {"max_steps": 6, "deterministic": True}}))
    capsys.readouterr()
    try:
        run_train()
    finally:
        torch.use_deterministic_algorithms(False)  # configure_torch sets it process-wide
    out = capsys.readouterr().out
    assert f"resuming from {run_dir() / 'step_000000003.pt'}" in out
    assert "now with deterministic False -> True" in out
    assert [r["step"] for r in read_losses()] == [str(s) for s in range(1, 7)]


def test_unreadable_newest_checkpoint_is_skipped(project, capsys, uninterrupted):
    params = make_project(project, **merge(PARAMS, {"train": {"max_steps": 8}}))
    run_train()
    newest = project / run_dir() / "step_000000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # as a full disk would leave it
    set_params(project, merge(params, {"train": {"max_steps": 0}}))
    capsys.readouterr()
    run_train()
    out = capsys.readouterr().out
    assert "skipping unreadable checkpoint" in out
    assert f"resuming from {run_dir() / 'step_000000006.pt'}" in out
    assert_same_run(outputs(project), uninterrupted)


def test_fresh_ignores_checkpoints(project, capsys):
    make_project(project, **merge(PARAMS, {"train": {"max_steps": 4}}))
    run_train()
    capsys.readouterr()
    run_train(fresh=True)
    assert "resuming" not in capsys.readouterr().out
    assert [r["step"] for r in read_losses()] == ["1", "2", "3", "4"]


@pytest.mark.parametrize("saved, resumed", [(torch.channels_last, torch.contiguous_format),
                                            (torch.contiguous_format, torch.channels_last)])
def test_a_checkpoint_resumes_in_another_memory_layout(saved, resumed):
    """CUDA trains channels_last, CPU contiguous: a checkpoint from one must resume on the other.

    Adam's moments are saved in the layout of the run that wrote them; the fused step of the
    resuming run must pair each moment with its own weight. The reference resumes from the same
    values with every tensor in the resuming run's layout."""
    cfg = config_from_dict(merge(TRAIN_PARAMS, {"train": {"pool_size": 0}}))
    cpu = torch.device("cpu")
    writer = CycleGAN(cfg, cpu, memory_format=saved)
    real = [torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(4)]
    writer.train_step(real[0].contiguous(memory_format=saved), real[1].contiguous(memory_format=saved))
    buffer = io.BytesIO()
    torch.save(shared_state(writer), buffer)

    def resume(to_layout: bool) -> CycleGAN:
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        if to_layout:
            state = _to_layout(state, resumed)
        model = CycleGAN(cfg, cpu, memory_format=resumed)
        load_shared_state(model, state)
        model.train_step(real[2].contiguous(memory_format=resumed), real[3].contiguous(memory_format=resumed))
        return model

    ours, reference = resume(False), resume(True)
    for name in ours.nets:
        for (k, p), q in zip(ours.nets[name].named_parameters(), reference.nets[name].parameters()):
            assert torch.equal(p, q), f"{name}.{k}"


def _to_layout(obj, memory_format):
    if torch.is_tensor(obj):
        return obj.contiguous(memory_format=memory_format) if obj.dim() == 4 else obj
    if isinstance(obj, dict):
        return {k: _to_layout(v, memory_format) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_layout(v, memory_format) for v in obj]
    return obj


def test_resuming_after_the_pools_filled_restores_them_and_their_random_stream(tmp_path, monkeypatch, capsys):
    """With pool_size 2 the pools are full after 2 steps and swap from then on: a run stopped at
    step 9 and resumed must hand D the same pooled fakes as an uninterrupted run (a pool left
    empty on resume would return each new fake as it is, and change every loss after)."""
    params = merge(PARAMS, {"train": {"pool_size": 2, "checkpoint_every": 100}})
    reference, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    reference.mkdir()
    resumed.mkdir()
    make_project(reference, **params)
    with pytest.MonkeyPatch.context() as mp:
        enter_project(mp, reference)
        run_train()
    written = make_project(resumed, **merge(params, {"train": {"max_steps": 9}}))
    enter_project(monkeypatch, resumed)
    run_train()
    state = torch.load(run_checkpoints()[-1], weights_only=True)
    pool = state["ranks"][0]["pool_A"]
    assert state["step"] == 9 and pool["images"].shape[0] == 2  # full, and swapping since step 3
    set_params(resumed, merge(written, {"train": {"max_steps": 0}}))
    run_train()
    # The whole line: step 9 of 12-step epochs is in the first epoch, and nothing else changed.
    assert f"cyclegan train: resuming from {run_dir() / 'step_000000009.pt'} (epoch 1, step 9)\n" in capsys.readouterr().out
    assert_same_run(outputs(resumed), outputs(reference))
