"""A shared MLflow tracking server, as the README sets one up: PostgreSQL for runs, S3 (SeaweedFS)
for artifacts served through the server, and basic-auth. All real, on 127.0.0.1 (tests/servers.py).

The pipeline and a `dvc queue start -j 2` sweep log into it with credentials from the environment
only; a process that knows only the server's URL loads a registered generator; `cyclegan compare`
reads the sweep from it; a wrong password or no server stops `train` in one line, in seconds;
an outage during training loses nothing. One set of servers serves the whole module.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from helpers import PIPELINE_PARAMS, VENV_BIN, make_project, merge, pipeline_repo, run, wait_for, wait_for_experiments
from servers import Restartable, create_bucket, free_ports, mlflow_server

DVC = str(VENV_BIN / "dvc")
ADMIN = ("admin", "admin-password-0123")
USER = ("trainer", "trainer-secret-9f3a71c2")
MODEL_NAME = "h2z-shared"
PARAMS = merge(PIPELINE_PARAMS, {"tracking": {"register_as": MODEL_NAME}})


def api(url: str, path: str, body: dict | None, auth: tuple[str, str]) -> dict:
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres, s3_server):
    """`mlflow server --app-name basic-auth` on a database and a bucket of this module's, on the
    session's PostgreSQL and SeaweedFS (restartable: the outage test stops it), with the account
    `trainer` created by the admin."""
    folder = tmp_path_factory.mktemp("tracking")
    database, bucket = postgres.database("tracking"), create_bucket(s3_server, "tracking")
    port = free_ports(1)[0]
    tracking = Restartable(lambda: mlflow_server(folder / "mlflow", database, s3_server, admin=ADMIN, port=port,
                                                 bucket=bucket))
    try:
        tracking.start()
        api(tracking.server.url, "/api/2.0/mlflow/users/create", {"username": USER[0], "password": USER[1]}, ADMIN)
        yield tracking
    finally:
        tracking.stop()


def client_env(url: str, user: tuple[str, str] = USER) -> dict[str, str]:
    """A machine that logs to the server: its URL and the account, in the environment only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]}


# MLflow alone retries an unreachable server for over 4 minutes. The whole `cyclegan train` process
# (Python, torch and MLflow imports on a loaded 2-core machine) must stop well before; the check
# itself takes at most its timeout.
PROCESS_LIMIT_S = 120


def check_fails_fast(url: str, monkeypatch, user: tuple[str, str]) -> str:
    """tracking_server.check itself, in this process: its one-line error, within its timeout."""
    from cyclegan import tracking_server
    from cyclegan.errors import UserError

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        tracking_server.check(url, "cyclegan")
    assert time.monotonic() - started < tracking_server.CHECK_TIMEOUT_S + 1
    return str(error.value)


def train_fails(root: Path, env: dict[str, str]) -> tuple[str, float]:
    """`cyclegan train` in project `root` must stop with exit code 2; (its stderr, seconds)."""
    started = time.monotonic()
    proc = subprocess.run([str(VENV_BIN / "cyclegan"), "train"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not list(root.glob("models/checkpoints/*/step_*.pt"))  # stopped before any training step
    return proc.stderr, seconds


def test_train_stops_in_one_line_within_seconds_when_the_server_is_unreachable(tmp_path, monkeypatch):
    make_project(tmp_path)
    url = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    stderr, seconds = train_fails(tmp_path, client_env(url))
    assert stderr.count("\n") == 1 and stderr.startswith("cyclegan train: error: "), stderr
    assert url in stderr and "unreachable" in stderr and "MLFLOW_TRACKING_URI" in stderr, stderr
    assert seconds < PROCESS_LIMIT_S, seconds
    assert "unreachable" in check_fails_fast(url, monkeypatch, USER)


def test_a_local_store_needs_no_server_and_urls_are_shown_without_credentials(tmp_path, monkeypatch):
    """The default (nothing configured) asks no server; a URL holding user:password is shown masked."""
    from cyclegan import tracking_server
    from cyclegan.errors import UserError

    for local in (f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "mlruns"), (tmp_path / "mlruns").as_uri()):
        tracking_server.check(local, "cyclegan")  # returns at once, whatever is (not) there
    port = free_ports(1)[0]
    with pytest.raises(UserError) as error:
        tracking_server.check(f"http://alice:s3cret-pw@127.0.0.1:{port}", "cyclegan")
    assert "s3cret-pw" not in str(error.value) and f"http://***@127.0.0.1:{port}" in str(error.value)


@pytest.mark.slow
def test_train_stops_in_one_line_on_a_wrong_password(tmp_path, server, monkeypatch):
    make_project(tmp_path)
    wrong = (USER[0], "not-the-password-123")
    stderr, seconds = train_fails(tmp_path, client_env(server.server.url, wrong))
    assert stderr.count("\n") == 1 and "rejected user 'trainer'" in stderr, stderr
    assert "MLFLOW_TRACKING_PASSWORD" in stderr and wrong[1] not in stderr, stderr
    assert seconds < PROCESS_LIMIT_S, seconds
    assert "rejected user 'trainer'" in check_fails_fast(server.server.url, monkeypatch, wrong)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, server):
    """The tiny pipeline, then a sweep of two seeds run by `dvc queue start -j 2`, into the server."""
    url = server.server.url
    repo, env = pipeline_repo(tmp_path_factory.mktemp("shared") / "project", PARAMS)
    env = {**env, **{k: v for k, v in client_env(url).items() if k.startswith("MLFLOW_")}}
    logs = [run([DVC, "repro"], repo, env)]
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline"], repo, env)
    logs.append(run([DVC, "exp", "run", "--queue", "-S", "seed=1,2"], repo, env))
    # The workers outlive `dvc queue start` and keep its stdout: a file, not a pipe to wait on.
    with open(repo.parent / "queue-start.log", "w") as out:
        subprocess.run([DVC, "queue", "start", "-j", "2"], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                       check=True, timeout=120)

    wait_for_experiments(repo, env, 2, 450, "the queued sweep")
    logs.append(run([DVC, "queue", "stop"], repo, env))
    logs.append(subprocess.CompletedProcess([], 0, (repo.parent / "queue-start.log").read_text(), ""))
    return repo, env, logs


def runs_of(url: str, monkeypatch) -> tuple[list, object]:
    """The server's runs and a client, as the account `trainer` (MLflow reads it from the environment)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER[1])
    client = mlflow.MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("cyclegan")
    return client.search_runs([experiment.experiment_id]), client


@pytest.mark.slow
def test_the_pipeline_and_a_queued_sweep_log_everything_into_the_server(server, sweep, tmp_path, monkeypatch):
    repo, env, _ = sweep
    url = server.server.url
    runs, client = runs_of(url, monkeypatch)
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert {"fid_A2B", "kid_A2B", "fid_B2A", "kid_B2A", "final_loss_G_A"} <= set(r.data.metrics), r.data.metrics
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id, "report")}
        assert "report/index.html" in artifacts, artifacts
        models = client.search_logged_models([r.info.experiment_id],
                                             filter_string=f"source_run_id = '{r.info.run_id}'")
        assert sorted(m.name for m in models) == ["G_A", "G_B"]
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), r.info.artifact_uri  # served by the server

    # A process that knows only the server's URL (and the account) loads a registered generator.
    first_test_image = tmp_path / "horse.npy"
    prepared = repo / "data/prepared/toy_horse2zebra"
    np.save(first_test_image, np.load(prepared / "testA.npy")[:1])
    script = ("import mlflow, numpy as np, sys; model = mlflow.pyfunc.load_model(sys.argv[1]); "
              "np.save(sys.argv[3], model.predict(np.load(sys.argv[2])))")
    out = tmp_path / "zebra.npy"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    only_url = {k: v for k, v in client_env(url).items() if k != "PYTHONPATH"}
    run([sys.executable, "-c", script, f"models:/{MODEL_NAME}/1", str(first_test_image), str(out)], elsewhere,
        only_url)
    zebra = np.load(out)
    assert zebra.shape == (1, 32, 32, 3) and zebra.dtype == np.uint8
    assert not np.array_equal(zebra, np.load(first_test_image))

    # `cyclegan compare` reads the sweep from the server.
    compared = run([str(VENV_BIN / "cyclegan"), "compare", "--source", "mlflow", "--param", "seed"], repo, env)
    assert "3 experiments" in compared.stderr, compared.stderr


@pytest.mark.slow
def test_credentials_appear_nowhere_but_the_environment(server, sweep, monkeypatch):
    repo, env, logs = sweep
    password = USER[1].encode()
    found = [str(p) for p in repo.rglob("*") if p.is_file() and not p.is_symlink() and password in p.read_bytes()]
    assert found == []  # params, dvc.lock, git objects, .dvc/tmp (queue logs), reports, mlflow-pending
    assert all(USER[1] not in log.stdout + log.stderr for log in logs)
    runs, client = runs_of(server.server.url, monkeypatch)
    for r in runs:
        assert USER[1] not in json.dumps({**r.data.params, **r.data.tags})
        report = client.download_artifacts(r.info.run_id, "report/index.html")
        assert password not in Path(report).read_bytes()


@pytest.mark.slow
def test_an_outage_during_training_loses_nothing(server, tmp_path, monkeypatch):
    """The server stops while `train` runs and stays away until it ends: training finishes with
    all its outputs, says in one line what was not logged, and `cyclegan log-pending` logs it."""
    epochs = 4
    make_project(tmp_path, train={"n_epochs": epochs // 2, "n_epochs_decay": epochs // 2, "log_every": 4})
    env = client_env(server.server.url)
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(VENV_BIN / "cyclegan"), "train"], cwd=tmp_path, env=env, stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or any((tmp_path / "models/checkpoints").glob("*/step_*.pt")),
                 300, "the first checkpoint", poll=0.2)
        # Training waits while the server goes away, so the outage falls mid-run however fast it trains.
        proc.send_signal(signal.SIGSTOP)
        server.stop()
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        server.start()
    output = log.read_text()
    assert "the MLflow tracking server is unreachable; training goes on" in output, output[-3000:]
    for name in ("models/G_A.safetensors", "models/G_B.safetensors", "metrics/train.json",
                 "metrics/train_losses.csv", "metrics/train_eval.csv"):
        assert (tmp_path / name).exists(), name
    lines = [line for line in output.splitlines() if "are not logged to run" in line]
    assert len(lines) == 1 and "run `cyclegan log-pending` when it is back" in lines[0], output[-3000:]
    assert USER[1] not in output
    (run_id,) = [p.name for p in (tmp_path / "mlflow-pending").iterdir()]

    run([str(VENV_BIN / "cyclegan"), "log-pending"], tmp_path, env)
    assert not (tmp_path / "mlflow-pending" / run_id).exists()
    _, client = runs_of(server.server.url, monkeypatch)
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    losses = [int(row.split(",")[0]) for row in (tmp_path / "metrics/train_losses.csv").read_text().splitlines()[1:]]
    assert [m.step for m in client.get_metric_history(run_id, "loss_G_A")] == losses == list(range(4, 49, 4))
    samples = {a.path for a in client.list_artifacts(run_id, "samples/A2B")}
    assert samples == {f"samples/A2B/epoch_{e:04d}.png" for e in range(1, epochs + 1)}, samples
    # The grids under a key and step too (MLflow's image view), those of the outage included.
    from cyclegan import tracking

    keyed = {(key, step) for key, step, _ in tracking.logged_images(client, run_id)}
    assert keyed == {(tracking.sample_image_key(d), e) for d in ("A2B", "B2A") for e in range(1, epochs + 1)}, keyed
    assert "train_losses.csv" in {a.path for a in client.list_artifacts(run_id)}
    models = client.search_logged_models([finished.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert sorted(m.name for m in models) == ["G_A", "G_B"]
    assert finished.data.tags["generators_sha256"]
