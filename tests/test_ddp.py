"""Data-parallel training on CPU with Gloo: 2 processes x batch 1 is 1 process x batch 2.

What is comparable: with instance norm every image is normalised on its own, and every loss is
a mean over the batch, so the mean of the two ranks' gradients (DDP's all-reduce) is the
gradient of the batch of 2. The image pools differ (one per rank, each with its own random
stream) but hand back every fake unchanged until they hold pool_size images, which covers the
steps compared here. Equal up to float rounding, then: the all-reduce sums in another order.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from cyclegan import paths
from cyclegan.config import config_from_dict
from cyclegan.prepared_data import PositionSampler, UnpairedTrainSet
from cyclegan.distributed import Distributed
from cyclegan.model import LOSS_TERMS, CycleGAN
from cyclegan.runtime import build_model
from helpers import (assert_same_gradients, enter_project, run_dir, generator_weights, make_project, merge, project_env,
                     mlflow_client, read_losses, record_gradients, run_id, run_train, set_params)

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


def torchrun(root: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "cyclegan", "train"],
                          cwd=root, env=project_env(root), capture_output=True, text=True, timeout=600)


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
