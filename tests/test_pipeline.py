"""End to end: the real DVC pipeline in a temp git repo, then an experiment, then the MLflow store."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cyclegan.model import LOSS_TERMS
from helpers import PIPELINE_PARAMS, VENV_BIN, copy_repo, run

# The README's `dvc exp show --only-changed --drop ...`: the dependency hash columns.
DROP_FILE_COLUMNS = "^(data|models|metrics)/"
N_TEST = PIPELINE_PARAMS["data"]["toy"]["n_test"]
# 2 epochs of 12 steps (PIPELINE_PARAMS).
STEPS = (PIPELINE_PARAMS["train"]["n_epochs"] + PIPELINE_PARAMS["train"]["n_epochs_decay"]) * 12


def find_params(exp: dict) -> dict:
    return exp["data"]["params"]["params.yaml"]["data"]


def results(project: Path) -> tuple[dict, str]:
    """metrics/eval.json and the per-step losses."""
    return (json.loads((project / "metrics/eval.json").read_text()),
            (project / "metrics/train_losses.csv").read_text())


@pytest.mark.slow
def test_repro_then_experiment(reproduced_pipeline, tmp_path):
    # The session's `dvc repro` of PIPELINE_PARAMS (conftest), committed; a copy of it.
    project, env = copy_repo(reproduced_pipeline.repo, tmp_path / "project"), reproduced_pipeline.env

    for out in ("data/raw/toy_horse2zebra", "data/prepared/toy_horse2zebra/manifest.json",
                "models/G_A.safetensors", "models/G_B.safetensors", "metrics/train.json",
                "metrics/train_losses.csv", "metrics/train_eval.csv", "data/translated/A2B", "data/translated/B2A",
                "metrics/eval.json", "metrics/eval_details.json", "reports/index.html",
                "reports/dataset_preview.png", "dvc.lock"):
        assert (project / out).exists(), out
    assert len(list((project / "data/translated/A2B").glob("*.png"))) == N_TEST
    metrics = json.loads((project / "metrics/eval.json").read_text())
    for key in ("fid_A2B", "kid_A2B", "fid_B2A", "kid_B2A", "fid_baseline", "kid_baseline",
                "gt_l1_A2B", "gt_l1_identity"):
        assert math.isfinite(metrics[key]), key
    train = json.loads((project / "metrics/train.json").read_text())
    assert len(train) == 8 and all(math.isfinite(v) for v in train.values())
    assert (project / "metrics/train_losses.csv").read_text().splitlines()[-1].startswith(f"{STEPS},")
    assert "Running stage 'train'" in reproduced_pipeline.stdout

    # Nothing changed: a second repro runs no stage (in another folder: DVC hashes its files anew).
    again = run([str(VENV_BIN / "dvc"), "repro"], project, env)
    assert "didn't change, skipping" in again.stdout and "Running stage 'train'" not in again.stdout
    assert run(["git", "status", "--porcelain"], project, env).stdout == ""
    run([str(VENV_BIN / "dvc"), "exp", "run", "-S", "lambda_cycle=5"], project, env)
    shown = json.loads(run([str(VENV_BIN / "dvc"), "exp", "show", "--json"], project, env).stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    lambdas = [find_params(run_["revs"][0])["lambda_cycle"] for run_ in experiments]
    assert 5 in lambdas

    # `dvc exp show` is a table of results: the changed metrics are the scores and final losses,
    # nothing of the protocol, the data counts, timings or run ids. Beside them DVC lists the
    # changed dependencies of each stage (file hashes), which the README's command drops.
    table = run([str(VENV_BIN / "dvc"), "exp", "show", "--only-changed", "--csv"], project, env).stdout
    columns = set(table.splitlines()[0].split(",")) - {"Experiment", "rev", "typ", "Created", "parent", "State",
                                                       "Executor"}
    results_columns = {"fid_A2B", "fid_B2A", "kid_A2B", "kid_B2A", "gt_l1_A2B", "gt_l1_B2A",
                       *(f"loss_{k}" for k in LOSS_TERMS), "lambda_cycle"}
    assert {c for c in columns if not re.match(DROP_FILE_COLUMNS, c)} == results_columns, columns
    shown = run([str(VENV_BIN / "dvc"), "exp", "show", "--only-changed", "--drop", DROP_FILE_COLUMNS, "--no-pager"],
                project, {**env, "COLUMNS": "400"}).stdout
    header = next(line for line in shown.splitlines() if "Experiment" in line)
    assert set(header.split()) == {"Experiment", "Created", *results_columns}, header
    assert max(len(line.rstrip()) for line in shown.splitlines() if "─" not in line) <= 230, shown

    # Back to the baseline: its outputs come back from git and the DVC cache, and nothing is stale.
    run(["git", "checkout", "--", "."], project, env)
    run([str(VENV_BIN / "dvc"), "checkout"], project, env)
    status = json.loads(run([str(VENV_BIN / "dvc"), "status", "--json"], project, env).stdout)
    assert status == {"download": ["always changed"]}, status  # download checks the dataset each time
    assert run(["git", "status", "--porcelain"], project, env).stdout == ""

    import mlflow

    # One run per pipeline run (evaluate and report found train's): the baseline's in the session
    # repo's store, the experiment's in the copy's (copy_repo leaves the store behind).
    def runs_in(root: Path) -> list:
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        return client.search_runs([client.get_experiment_by_name("cyclegan").experiment_id])

    (baseline,) = runs_in(reproduced_pipeline.repo)
    assert baseline.data.params["lambda_cycle"] == "10.0" and "fid_A2B" in baseline.data.metrics
    runs = runs_in(project)
    assert len(runs) == 1, [r.data.params.get("lambda_cycle") for r in runs]
    ablation = [r for r in runs if r.data.params.get("lambda_cycle") == "5.0"]
    assert ablation, [r.data.params.get("lambda_cycle") for r in runs]
    assert {"fid_A2B", "kid_A2B", "fid_B2A", "kid_B2A"} <= set(ablation[0].data.metrics)
    assert ablation[0].data.params["identity_weight_effective"] == "2.5"
    assert ablation[0].data.tags.get("dvc_exp_name")


@pytest.mark.slow
def test_repro_killed_mid_training_then_rerun_ends_with_the_same_metrics(tmp_path, reproduced_pipeline):
    # A copy of the session's pipeline that never trained: its training outputs and checkpoints
    # removed, and DVC's cache (which would give them back), so that `dvc repro` trains from the
    # outputs of download and prepare, as on a fresh clone.
    project, env = copy_repo(reproduced_pipeline.repo, tmp_path / "project"), reproduced_pipeline.env
    expected = results(project), (project / "dvc.lock").read_text()
    shutil.rmtree(project / ".dvc/cache")
    shutil.rmtree(project / "models/checkpoints")
    for out in ("models/G_A.safetensors", "models/G_B.safetensors", "metrics/eval.json"):
        (project / out).unlink()
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
    assert not (project / "models/G_A.safetensors").exists()  # killed inside train, before its end
    assert not (project / "metrics/eval.json").exists()

    again = run([str(VENV_BIN / "dvc"), "repro"], project, env)
    assert "Running stage 'prepare'" not in again.stdout
    assert re.search(r"cyclegan train: resuming from models/checkpoints/[0-9a-f]{16}/step_", again.stdout)
    assert results(project) == expected[0]
    # Killed and resumed: every output DVC hashes has the same bytes as the uninterrupted run's.
    assert (project / "dvc.lock").read_text() == expected[1]
