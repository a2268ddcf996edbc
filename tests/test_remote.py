"""Results that travel: two machines (two clones) sharing a bare git repo and an S3 DVC remote.

Machine 1 runs the tiny pipeline and an experiment and pushes; machine 2, a fresh clone with an
empty cache, pulls and finds nothing to rerun, the generators usable, the report there, and the
experiment with its metrics. The remote is a real S3 server (SeaweedFS) on 127.0.0.1; its keys
live in .dvc/config.local (never committed).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers import VENV_BIN, copy_repo, dvc_env, run
from servers import create_bucket, free_ports

DVC = str(VENV_BIN / "dvc")
EXPERIMENT = "cycle5"


def add_remote(repo: Path, env: dict[str, str], s3, bucket: str) -> None:
    """The README's commands: the remote and its endpoint in .dvc/config, the keys in config.local."""
    run([DVC, "remote", "add", "-d", "storage", f"s3://{bucket}/store"], repo, env)
    run([DVC, "remote", "modify", "storage", "endpointurl", s3.endpoint], repo, env)
    set_keys(repo, env, s3)


def set_keys(repo: Path, env: dict[str, str], s3) -> None:
    run([DVC, "remote", "modify", "--local", "storage", "access_key_id", s3.access_key], repo, env)
    run([DVC, "remote", "modify", "--local", "storage", "secret_access_key", s3.secret_key], repo, env)


@pytest.fixture(scope="module")
def machine1(tmp_path_factory, reproduced_pipeline, s3_server):
    """Clone 1: the session's pipeline (conftest.reproduced_pipeline) and one experiment run, the
    remote (a bucket of this module's on the session's S3 server) configured, git pushed to a bare
    repo."""
    base = tmp_path_factory.mktemp("machines")
    origin = base / "origin.git"
    env = dvc_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    run(["git", "init", "-q", "--bare", str(origin)], base, env)
    repo = copy_repo(reproduced_pipeline.repo, base / "clone1")
    add_remote(repo, env, s3_server, create_bucket(s3_server, "remote"))
    run(["git", "remote", "add", "origin", str(origin)], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "the DVC remote"], repo, env)
    run([DVC, "exp", "run", "-n", EXPERIMENT, "-S", "lambda_cycle=5"], repo, env)
    # Back to the baseline in the workspace; the experiment lives in its ref and the cache.
    run(["git", "checkout", "--", "."], repo, env)
    run([DVC, "checkout"], repo, env)
    return repo, origin, env


@pytest.mark.slow
def test_push_to_an_unreachable_remote_fails_in_one_line_then_completes(machine1, s3_server):
    repo, _, env = machine1
    # The remote unreachable (nothing listens at its endpoint: a server down), then back.
    run([DVC, "remote", "modify", "--local", "storage", "endpointurl", f"http://127.0.0.1:{free_ports(1)[0]}"],
        repo, env)
    try:
        started = time.monotonic()
        proc = run_failing([DVC, "push"], repo, env)
        seconds = time.monotonic() - started
    finally:
        run([DVC, "remote", "modify", "--local", "--unset", "storage", "endpointurl"], repo, env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, proc.stderr
    assert "failed to push" in errors[0] or "Unable to" in errors[0] or "connect" in errors[0].lower(), errors
    assert seconds < 120, seconds
    pushed = run([DVC, "push"], repo, env)
    assert "pushed" in pushed.stdout or "Everything is up to date" in pushed.stdout, pushed.stdout
    status = json.loads(run([DVC, "status", "--cloud", "--json"], repo, env).stdout)
    assert status == {}, status  # every cached output of the workspace is on the remote


def run_failing(cmd: list[str], cwd: Path, env: dict[str, str]):
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, f"{cmd} succeeded:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_a_second_machine_pulls_the_results_and_the_experiment(machine1, s3_server, tmp_path):
    repo, origin, env = machine1
    run([DVC, "push"], repo, env)
    run(["git", "push", "-q", "origin", "HEAD:main"], repo, env)
    run([DVC, "exp", "push", "origin", EXPERIMENT], repo, env)
    tracked = run(["git", "ls-files"], repo, env).stdout.splitlines()
    assert ".dvc/config" in tracked and ".dvc/config.local" not in tracked
    history = run(["git", "log", "-p", "--all"], repo, env).stdout
    assert s3_server.secret_key not in history and s3_server.access_key not in history

    clone = tmp_path / "clone2"
    run(["git", "clone", "-q", "--branch", "main", str(origin), str(clone)], tmp_path, env)
    assert not (clone / ".dvc" / "cache").exists()  # its own, empty cache
    set_keys(clone, env, s3_server)
    run([DVC, "pull"], clone, env)
    status = json.loads(run([DVC, "status", "--json"], clone, env).stdout)
    assert status == {"download": ["always changed"]}, status  # nothing to rerun
    assert run(["git", "status", "--porcelain"], clone, env).stdout == ""
    assert (clone / "reports/index.html").stat().st_size > 1000
    for name in ("metrics/eval.json", "models/G_A.safetensors", "data/translated/A2B"):
        assert (clone / name).exists(), name

    photos = clone / "data/raw/toy_horse2zebra/testA"
    out = tmp_path / "translated"
    run([str(VENV_BIN / "cyclegan"), "translate", "--input", str(photos), "--output", str(out)], clone,
        {**env, "OMP_NUM_THREADS": "1"})
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(p.stem for p in photos.iterdir())

    run([DVC, "exp", "pull", "origin", EXPERIMENT], clone, env)
    shown = json.loads(run([DVC, "exp", "show", "--json"], clone, env).stdout)
    experiments = {e["name"]: e["revs"][0]["data"] for rev in shown for e in (rev.get("experiments") or [])}
    assert EXPERIMENT in experiments, list(experiments)
    data = experiments[EXPERIMENT]
    assert data["params"]["params.yaml"]["data"]["lambda_cycle"] == 5
    metrics = data["metrics"]["metrics/eval.json"]["data"]
    assert {"fid_A2B", "kid_A2B", "fid_B2A", "kid_B2A"} <= set(metrics)

    baseline_metrics = json.loads((clone / "metrics/eval.json").read_text())
    run([DVC, "exp", "apply", EXPERIMENT], clone, env)
    applied = json.loads((clone / "metrics/eval.json").read_text())
    assert applied == metrics and applied != baseline_metrics
    status = json.loads(run([DVC, "status", "--json"], clone, env).stdout)
    assert status == {"download": ["always changed"]}, status  # the experiment's outputs, pulled
