"""Data-parallel training on CPU with Gloo: 2 processes x batch 1 is 1 process x batch 2.

What is comparable: with instance norm every image is normalised on its own, and every loss is
a mean over the batch, so the mean of the two ranks' gradients (DDP's all-reduce) is the
gradient of the batch of 2. The image pools differ (one per rank, each with its own random
stream) but hand back every fake unchanged until they hold pool_size images, which covers the
steps compared here. Equal up to float rounding, then: the all-reduce sums in another order.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch.utils.data import DataLoader

from cyclegan import checkpoint, paths
from cyclegan.config import config_from_dict
from cyclegan.prepared_data import PositionSampler, UnpairedTrainSet
from cyclegan.distributed import Distributed
from cyclegan.model import LOSS_TERMS, CycleGAN
from cyclegan.runtime import build_model
from helpers import (VENV_BIN, assert_same_gradients, background_process, enter_project, free_port,
                     generator_weights, make_project, merge, mlflow_client, pipeline_repo, project_env, read_losses,
                     process_alive, record_gradients, require_tier, run, run_dir, run_id, run_train, set_params, wait_for)

# Compared steps: from the third, rounding differences grow past 1e-4 (see the torchrun test).
STEPS = 2


def train_steps(params: dict, data: Path, rank: int, world: int, batch: int) -> tuple[list, list, CycleGAN]:
    """STEPS steps of CycleGAN.train_step on this rank's share of epoch 0, the model built as `train`
    builds it (DDP-wrapped with world > 1); the losses of the global batch and the gradients each
    optimizer step applied."""
    cfg = config_from_dict(params)
    torch.manual_seed(cfg.seed + rank)
    model = build_model(cfg, torch.device("cpu"), Distributed(rank, world))
    grads = record_gradients(model.opt_G, model.opt_D)
    dataset = UnpairedTrainSet(np.load(data / "trainA.npy"), np.load(data / "trainB.npy"),
                               cfg.data.crop_size, not cfg.data.no_flip, cfg.seed)
    sampler = PositionSampler(len(dataset) - len(dataset) % world, 0, rank, world)
    losses = []
    for _, (a, b) in zip(range(STEPS), DataLoader(dataset, batch_size=batch, sampler=sampler)):
        step = model.train_step(a.float() / 127.5 - 1, b.float() / 127.5 - 1)
        values = torch.stack([step[k] for k in LOSS_TERMS])
        if world > 1:
            dist.all_reduce(values)
            values /= world
        losses.append(values)
    return losses, grads, model


def _rank(rank: int, world: int, init_file: str, params: dict, data: Path, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        losses, grads, model = train_steps(params, data, rank, world, batch=1)
        torch.save({"losses": losses, "grads": grads,
                    "nets": {k: v.state_dict() for k, v in model.nets.items()}}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_as_one_process_with_the_global_batch(tmp_path):
    params = make_project(tmp_path)
    data = tmp_path / paths.PREPARED / "toy_horse2zebra"
    mp.spawn(_rank, args=(2, str(tmp_path / "rendezvous"), params, data, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # The replicas never diverge: the same all-reduced gradients, the same updates.
    for k, state in ranks[0]["nets"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, ranks[1]["nets"][k][name]), f"{k}.{name}"

    torch.set_num_threads(1)
    single_params = merge(params, {"train": {"batch_size": 2}})
    losses, grads, _ = train_steps(single_params, data, rank=0, world=1, batch=2)
    torch.testing.assert_close(torch.stack(ranks[0]["losses"]), torch.stack(losses), rtol=1e-4, atol=1e-6)
    assert_same_gradients(ranks[0]["grads"], grads)


def torchrun(root: Path, nproc: int = 2, *options: str) -> subprocess.CompletedProcess:
    require_tier("torchrun (its rendezvous server)")
    env = {k: v for k, v in project_env(root).items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *options, "-m", "cyclegan", "train"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_restarts_on_its_shared_store_are_refused_before_training(tmp_path):
    # torch's default store for restarts keeps the last attempt's keys: restarted workers hang.
    make_project(tmp_path)
    done = torchrun(tmp_path, 2, "--max-restarts", "1")
    assert done.returncode != 0
    assert ("torchrun --max-restarts 1 can hang at its first restart" in done.stderr
            and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in done.stderr), done.stderr[-3000:]
    assert "steps (" not in done.stdout and not (tmp_path / paths.CHECKPOINTS).exists()


@pytest.mark.slow
def test_torchrun_trains_resumes_and_matches_the_global_batch(tmp_path, monkeypatch):
    # 13 A images: an epoch of 13 positions, of which 2 ranks take 12 (6 steps) and none hangs.
    enter_project(monkeypatch, tmp_path)
    params = make_project(tmp_path, n_a=13, train={"max_steps": 7, "checkpoint_every": 4})
    first = torchrun(tmp_path)
    assert first.returncode == 0, first.stderr
    state = torch.load(tmp_path / run_dir(tmp_path) / "step_000000007.pt", weights_only=True)
    assert state["execution"]["world"] == 2 and state["epoch"] == 1 and state["position"] == 2
    assert len(state["ranks"]) == 2
    pools = [r["pool_A"]["images"] for r in state["ranks"]]
    assert pools[0].shape == pools[1].shape == (7, 3, 28, 28) and not torch.equal(*pools)

    set_params(tmp_path, merge(params, {"train": {"max_steps": 0}}))
    resumed = torchrun(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    rows = read_losses()
    assert [(r["step"], r["epoch"]) for r in rows] == [(str(s), str(1 + (s > 6))) for s in range(1, 13)]
    tags = mlflow_client(tmp_path).get_run(run_id(tmp_path)).data.tags
    assert tags["processes"] == "2" and tags["global_batch"] == "2"
    resumed_weights = generator_weights(paths.GENERATORS["G_A"])

    # The same run without interruption ends with the same bits.
    (tmp_path / "again").mkdir()
    make_project(tmp_path / "again", n_a=13)
    again = torchrun(tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert read_losses(tmp_path / "again" / paths.TRAIN_LOSSES) == rows
    again_weights = generator_weights(tmp_path / "again" / paths.GENERATORS["G_A"])
    assert all(torch.equal(again_weights[k], resumed_weights[k]) for k in again_weights)

    # One process with batch 2 gets the same images in the same steps. Only the first two steps
    # are compared: from the third, rounding differences have grown to 1e-4 and keep growing
    # (20% by step 6), as two GAN trainings that differ in the last bit diverge.
    (tmp_path / "single").mkdir()
    enter_project(monkeypatch, tmp_path / "single")
    make_project(tmp_path / "single", n_a=13, train={"batch_size": 2, "max_steps": 2})
    run_train()
    single = read_losses()
    assert len(single) == 2
    for ddp_row, row in zip(rows, single):
        for k in LOSS_TERMS:
            assert float(ddp_row[f"loss_{k}"]) == pytest.approx(float(row[f"loss_{k}"]), rel=1e-5), k


# --- several machines, on loopback ------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def _nodes(roots: list[Path], port: int, restarts: int = 0) -> Iterator[list[subprocess.Popen]]:
    """A torchrun job of one process on each of `roots` (a machine each, sharing no files): the
    README's multi-node command, c10d rendezvous on 127.0.0.1:port hosted by the first.

    c10d ranks the machines by their address: the first root's gets 127.0.0.1, so it is rank 0
    and writes the outputs; the others get 127.0.0.2, ... (loopback too).
    """
    with contextlib.ExitStack() as stack:
        procs = []
        for i, root in enumerate(roots):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(roots)),
                   "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", "two-machines", "--rdzv-conf", f"is_host={str(i == 0).lower()}",
                   "--local-addr", f"127.0.0.{i + 1}", "--max-restarts", str(restarts), "-m", "cyclegan", "train"]
            env = {**project_env(root), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # as the README says
            procs.append(stack.enter_context(background_process(cmd, root / "torchrun.log", env, root)))
        yield procs


def _finish(procs: list[subprocess.Popen], roots: list[Path]) -> list[str]:
    logs = []
    for proc, root in zip(procs, roots):
        code = proc.wait(timeout=600)
        logs.append((root / "torchrun.log").read_text())
        assert code == 0, logs[-1][-3000:]
    return logs


@pytest.mark.slow
def test_two_machines_train_as_one_with_a_worker_killed_and_rank_0_moved(tmp_path):
    """Two torchrun "machines" on loopback, each in its own folder (no shared file system), train
    the run a 2-process job on one machine trains, bit for bit (the same Gloo all-reduce of two
    ranks). A worker killed mid-run: with --max-restarts 1 the job restarts, resumes from rank 0's
    last checkpoint and ends as if uninterrupted. Started again with rank 0 on the other machine,
    the job resumes from the checkpoint on the machine that has it."""
    roots = {name: tmp_path / name for name in ("one", "x", "y")}
    for name, root in roots.items():
        root.mkdir()
        # 40 steps of global batch 2; a checkpoint every 4 steps.
        make_project(root, n_a=40, train={"checkpoint_every": 4, "log_every": 4,
                                          "nproc_per_node": 2 if name == "one" else 1})
    one = subprocess.run([sys.executable, "-m", "cyclegan", "train"], cwd=roots["one"], env=project_env(roots["one"]),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "40 steps (2 epochs of 20 steps, global batch 2) on 2 x cpu" in one.stdout
    reference = generator_weights(roots["one"] / paths.GENERATORS["G_A"])

    x, y = roots["x"], roots["y"]
    for root in (x, y):
        set_params(root, merge(yaml.safe_load((root / "params.yaml").read_text()), {"train": {"max_steps": 16}}))
    folder = x / paths.CHECKPOINTS / run_dir(roots["one"]).name  # the same run: 2 processes, same params
    with _nodes([x, y], free_port(), restarts=1) as procs:
        wait_for(lambda: checkpoint.newest_step(folder) >= 4, 300, "rank 0's first checkpoint", poll=0.05)
        workers = _children(procs[1].pid)
        assert len(workers) == 1 and checkpoint.newest_step(folder) < 16, "the run ended before the kill"
        os.kill(workers[0], signal.SIGKILL)
        logs = _finish(procs, [x, y])
    assert "resuming from" in logs[0] and checkpoint.newest_step(folder) == 16, logs[0][-3000:]
    assert not (y / paths.CHECKPOINTS).exists() and not (y / paths.MODELS).exists()

    # Again, all 40 steps, but now y is rank 0: its disk has no checkpoint, x's has step 16.
    for root in (x, y):
        set_params(root, merge(yaml.safe_load((root / "params.yaml").read_text()), {"train": {"max_steps": 0}}))
    with _nodes([y, x], free_port()) as procs:
        logs = _finish(procs, [y, x])
    assert f"resuming from {paths.CHECKPOINTS / folder.name / 'step_000000016.pt'}" in logs[1], logs[1][-3000:]
    assert "40 steps, 48 images in" in logs[0], logs[0][-3000:]
    resumed = generator_weights(y / paths.GENERATORS["G_A"])
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert read_losses(y / paths.TRAIN_LOSSES) == read_losses(roots["one"] / paths.TRAIN_LOSSES)


@pytest.mark.slow
def test_dvc_exp_run_trains_on_two_processes_and_resumes_after_a_kill(tmp_path):
    """`dvc exp run -S train.nproc_per_node=2`: the train stage starts its own 2 processes. Before it,
    the same params' `cyclegan train` was SIGKILLed (an OOM kill; `dvc queue kill` of a worker): its
    workers, in sessions of their own, exit too and free the run's lock, so the experiment resumes."""
    params = {"data": {"toy": {"n_train_a": 40, "n_train_b": 40, "n_test": 4}},
              "model": {"ngf": 8, "ndf": 8},
              "train": {"n_epochs": 1, "n_epochs_decay": 1, "checkpoint_every": 4, "threads": 1, "device": "cpu"},
              "eval": {"n_samples": 0, "device": "cpu"}}
    repo, env = pipeline_repo(tmp_path / "project", params)
    run([str(VENV_BIN / "dvc"), "repro", "prepare"], repo, env)
    set_params(repo, merge(yaml.safe_load((repo / "params.yaml").read_text()), {"train": {"nproc_per_node": 2}}))
    with background_process([str(VENV_BIN / "cyclegan"), "train"], tmp_path / "train.log", env, repo) as launcher:
        folder = wait_for(lambda: run_dir(repo) if (repo / run_dir(repo)).is_dir() else None, 300, "the run's folder")
        wait_for(lambda: checkpoint.newest_step(repo / folder) >= 4, 300, "the first checkpoint", poll=0.05)
        workers = _children(launcher.pid)
        assert len(workers) == 2 and checkpoint.newest_step(repo / folder) < 40
        os.kill(launcher.pid, signal.SIGKILL)
        wait_for(lambda: not any(map(process_alive, workers)), 10, "the workers to exit", poll=0.1)
    run(["git", "checkout", "params.yaml"], repo, env)
    exp = run([str(VENV_BIN / "dvc"), "exp", "run", "-S", "train.nproc_per_node=2", "train"], repo, env)
    assert f"resuming from {folder}" in exp.stdout, exp.stdout[-3000:]
    assert "40 steps (2 epochs of 20 steps, global batch 2) on 2 x cpu" in exp.stdout, exp.stdout[-3000:]
    locked = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]["params"]["params.yaml"]
    assert locked["train"]["nproc_per_node"] == 2
    assert "didn't change" in run([str(VENV_BIN / "dvc"), "repro", "train"], repo, env).stdout
