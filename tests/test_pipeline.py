"""End to end: the real DVC pipeline in a temp git repo, then an experiment, then the MLflow store."""
from __future__ import annotations

import json
import re
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import TINY, VENV_BIN, merge, pipeline_repo, run

# The smallest params that still run every stage for real: TINY over the project's params.yaml.
PARAMS = merge(TINY, {
    "data": {"toy": {"image_size": 32, "n_train_a": 24, "n_train_b": 24, "n_test": 6}},
    "train": {"log_every": 4, "checkpoint_every": 8},
    "eval": {"batch_size": 6, "n_samples": 2},
})


def find_params(exp: dict) -> dict:
    return exp["data"]["params"]["params.yaml"]["data"]


LOSS_COLUMNS = ("step", "epoch", "lr", "loss_G_A", "loss_G_B", "loss_cycle_A", "loss_cycle_B",
                "loss_idt_A", "loss_idt_B", "loss_D_A", "loss_D_B")


def results(project: Path) -> tuple[dict, list[dict]]:
    """metrics/eval.json and the per-step losses, without the wall-clock columns."""
    import csv

    with open(project / "metrics/train_losses.csv", newline="") as f:
        losses = [{k: row[k] for k in LOSS_COLUMNS} for row in csv.DictReader(f)]
    return json.loads((project / "metrics/eval.json").read_text()), losses


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """One uninterrupted `dvc repro` of PARAMS: the project, its env, and its results."""
    project, env = pipeline_repo(tmp_path_factory.mktemp("repro") / "project", PARAMS)
    run([str(VENV_BIN / "dvc"), "repro"], project, env)
    return project, env, results(project)


@pytest.mark.slow
def test_repro_then_experiment(reproduced):
    project, env, _ = reproduced

    for out in ("data/raw/toy_horse2zebra", "data/prepared/toy_horse2zebra/manifest.json",
                "models/G_A.pt", "models/G_B.pt", "models/mlflow_run.json", "metrics/train.json",
                "metrics/train_losses.csv", "data/translated/A2B", "data/translated/B2A",
                "metrics/eval.json", "reports/index.html", "reports/dataset_preview.png", "dvc.lock"):
        assert (project / out).exists(), out
    assert len(list((project / "data/translated/A2B").glob("*.png"))) == 6
    metrics = json.loads((project / "metrics/eval.json").read_text())
    for key in ("fid_A2B", "kid_A2B", "fid_B2A", "kid_B2A", "fid_baseline", "kid_baseline",
                "gt_l1_A2B", "gt_l1_identity"):
        assert math.isfinite(metrics[key]), key
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["steps"] == 48 and all(math.isfinite(v) for v in train.values() if isinstance(v, float))

    # Nothing changed: a second repro runs no stage.
    again = run([str(VENV_BIN / "dvc"), "repro"], project, env)
    assert "didn't change, skipping" in again.stdout and "Running stage 'train'" not in again.stdout

    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-qm", "baseline"], project, env)
    run([str(VENV_BIN / "dvc"), "exp", "run", "-S", "lambda_cycle=5"], project, env)
    shown = json.loads(run([str(VENV_BIN / "dvc"), "exp", "show", "--json"], project, env).stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    lambdas = [find_params(run_["revs"][0])["lambda_cycle"] for run_ in experiments]
    assert 5 in lambdas

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cyclegan")
    runs = client.search_runs([experiment.experiment_id])
    ablation = [r for r in runs if r.data.params.get("lambda_cycle") == "5.0"]
    assert ablation, [r.data.params.get("lambda_cycle") for r in runs]
    assert {"fid_A2B", "kid_A2B", "fid_B2A", "kid_B2A"} <= set(ablation[0].data.metrics)
    assert ablation[0].data.params["identity_weight_effective"] == "2.5"
    assert ablation[0].data.tags.get("dvc_exp_name")


@pytest.mark.slow
def test_repro_killed_mid_training_then_rerun_ends_with_the_same_metrics(tmp_path, reproduced):
    project, env = pipeline_repo(tmp_path / "project", PARAMS)
    checkpoints = project / "models/checkpoints"
    dvc = subprocess.Popen([str(VENV_BIN / "dvc"), "repro"], cwd=project, env=env, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not any(checkpoints.glob("*/step_*.pt")) and dvc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dvc.poll() is None, "dvc repro ended before it could be killed:\n" + dvc.stdout.read()
    os.killpg(dvc.pid, signal.SIGKILL)  # dvc and the train stage it runs
    dvc.wait(timeout=30)
    dvc.stdout.close()
    assert not (project / "models/G_A.pt").exists()  # killed inside train, before its end
    assert not (project / "metrics/eval.json").exists()

    again = run([str(VENV_BIN / "dvc"), "repro"], project, env)
    assert re.search(r"cyclegan train: resuming from models/checkpoints/[0-9a-f]{16}/step_", again.stdout)
    assert results(project) == reproduced[2]
