"""`cyclegan sweep`: a grid as a SLURM job array (README: A sweep on a SLURM cluster).

End to end on a real one-node SLURM cluster (tests/slurm.py), a bare git origin, a SeaweedFS DVC
remote and an MLflow server with basic auth: the sweep submits two tasks, one of them is requeued
mid-training and resumes; afterwards a fresh clone pulls both experiments and `cyclegan compare`
finds both runs on the server. The credentials travel in the environment only. The refusals
(unknown key, bad value, unpushed commit, no sbatch) are fast tests without a cluster.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import PIPELINE_PARAMS, VENV_BIN, merge, pipeline_repo, run, wait_for
from servers import create_bucket, mlflow_server
from slurm import slurm_cluster

CYCLEGAN = str(VENV_BIN / "cyclegan")
DVC = str(VENV_BIN / "dvc")
ADMIN = ("admin", "sweep-admin-password-7c1e")
# 2 + 2 epochs of 12 images: 48 training steps, a checkpoint every 8, so that a task caught at its
# first checkpoint is still training.
PARAMS = merge(PIPELINE_PARAMS, {"train": {"n_epochs": 2, "n_epochs_decay": 2}})
GRID = "lambda_cycle=5,10"
# The project's own code, changed in its commit: the tasks must run it, not the installed package.
MARKER = "cyclegan-sweep-test: the commit's own code"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def sweep_cmd(*args: str) -> list[str]:
    return [CYCLEGAN, "sweep", *args]


def project(base: Path, origin: Path | None, dvc_remote: str | None = "s3://cyclegan/store",
            endpoint: str = "http://127.0.0.1:9") -> tuple[Path, dict[str, str]]:
    """The tiny pipeline committed (with a DVC remote in .dvc/config) and pushed to `origin`."""
    repo, env = pipeline_repo(base / "project", PARAMS)
    download = repo / "src/cyclegan/stages/download.py"
    download.write_text(download.read_text() + f"\nimport sys as _sys\nprint({MARKER!r}, file=_sys.stderr)\n")
    if dvc_remote:
        run([DVC, "remote", "add", "-d", "storage", dvc_remote], repo, env)
        run([DVC, "remote", "modify", "storage", "endpointurl", endpoint], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "the sweep's baseline"], repo, env)
    if origin is not None:
        run(["git", "init", "-q", "--bare", str(origin)], base, env)
        run(["git", "remote", "add", "origin", str(origin)], repo, env)
        run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], repo, env)
    return repo, env


def fails(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """`cmd` must stop with exit code 2 and one line on stderr, which is returned."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("cyclegan sweep: error: "), proc.stderr
    return proc.stderr


# --- refusals, before anything is submitted ----------------------------------------------------------

@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """A committed, pushed project; MLFLOW_TRACKING_URI points at nothing (the checks before it refuse)."""
    base = tmp_path_factory.mktemp("refusals")
    repo, env = project(base, base / "origin.git")
    return repo, {**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}


def test_an_unknown_key_is_refused_naming_it(pushed):
    repo, env = pushed
    error = fails(sweep_cmd("-S", "lambda_cycle=5,10", "-S", "train.lrr=0.1,0.2", "--dry-run"), repo, env)
    assert "params.yaml has no key 'train.lrr'" in error and "-S lambda_cycle=5 -S train.lrr=0.1" in error, error


def test_a_bad_value_is_refused_before_submitting(pushed):
    repo, env = pushed
    error = fails(sweep_cmd("-S", "lambda_cycle=5,-1", "--dry-run"), repo, env)
    assert "-S lambda_cycle=-1: params.yaml: 'lambda_cycle' must be >= 0" in error, error


def test_an_unpushed_commit_is_refused_saying_git_push(pushed, tmp_path):
    repo, env = pushed
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", "--branch", "main", str(repo.parent / "origin.git"), str(clone)], tmp_path, env)
    (clone / "notes.txt").write_text("not yet pushed\n")
    error = fails(sweep_cmd("-S", GRID, "--dry-run"), clone, env)
    assert "notes.txt is not committed" in error and "git push" in error, error
    run(["git", "add", "notes.txt"], clone, env)
    run(["git", "commit", "-qm", "notes"], clone, env)
    error = fails(sweep_cmd("-S", GRID, "--dry-run"), clone, env)
    assert "is not on git remote 'origin'" in error and "`git push origin`" in error, error
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], clone, env)
    # Pushed, the next check speaks: the MLflow server (nothing listens at its URL).
    error = fails(sweep_cmd("-S", GRID, "--dry-run"), clone, env)
    assert "MLflow tracking server http://127.0.0.1:9" in error and "unreachable" in error, error


def test_without_sbatch_it_stops_in_one_line_and_dry_run_needs_none(pushed, tmp_path):
    repo, env = pushed
    system = tmp_path / "bin"  # the system's commands but SLURM's, and the project's environment
    system.mkdir()
    for program in Path("/usr/bin").iterdir():
        if program.name not in ("sbatch", "srun", "salloc"):
            (system / program.name).symlink_to(program)
    no_slurm = {**env, "PATH": f"{VENV_BIN}{os.pathsep}{system}"}
    assert shutil.which("sbatch", path=no_slurm["PATH"]) is None
    error = fails(sweep_cmd("-S", GRID), repo, no_slurm)
    assert "sbatch is not on PATH" in error and "--dry-run" in error, error
    # --dry-run needs no sbatch: it goes on to the next check.
    error = fails(sweep_cmd("-S", GRID, "--dry-run"), repo, no_slurm)
    assert "MLflow tracking server" in error, error


def test_no_shared_tracking_server_and_no_dvc_remote_are_refused(pushed, tmp_path):
    repo, env = pushed
    local = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    error = fails(sweep_cmd("-S", GRID, "--dry-run"), repo, local)
    assert "set MLFLOW_TRACKING_URI" in error, error
    bare, env2 = project(tmp_path, tmp_path / "origin.git", dvc_remote=None)
    error = fails(sweep_cmd("-S", GRID, "--dry-run"), bare, {**env2, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert "no default DVC remote in .dvc/config" in error, error


def test_reserved_sbatch_options_and_a_bad_name_are_refused(pushed):
    repo, env = pushed
    error = fails(sweep_cmd("-S", GRID, "--dry-run", "--", "--array=0-3"), repo, env)
    assert "sets --array itself" in error and "sbatch --array=1,3" in error, error
    error = fails(sweep_cmd("-S", GRID, "--dry-run", "--name", "../ablation"), repo, env)
    assert "--name '../ablation'" in error, error


def test_a_run_goes_to_the_cyclegan_experiment_when_another_task_creates_it_first(project, monkeypatch):
    """Two tasks starting on a new server both find no experiment; the one that loses the race to
    create it must still log into it (MLflow's set_experiment then leaves "Default" active)."""
    import mlflow
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    from cyclegan import tracking

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    created = mlflow.MlflowClient().create_experiment(tracking.EXPERIMENT)  # by the other task
    look_up = TrackingServiceClient.get_experiment_by_name
    misses = 2  # the look-ups that ran before the other task's creation landed

    def get_experiment_by_name(self, name):
        nonlocal misses
        misses -= 1
        return None if misses >= 0 else look_up(self, name)

    monkeypatch.setattr(TrackingServiceClient, "get_experiment_by_name", get_experiment_by_name)
    try:
        tracking._use_experiment(mlflow)
        with mlflow.start_run() as run:
            assert run.info.experiment_id == created
    finally:
        mlflow.tracking.fluent._active_experiment_id = None


# --- end to end on a SLURM cluster ----------------------------------------------------------------------

def proc_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def training_processes(conf: Path) -> dict[int, tuple[str, Path]]:
    """pid -> (array task id, the run folder whose lock it holds) of the cluster's `cyclegan train`s."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            args = [a for a in (entry / "cmdline").read_bytes().split(b"\0") if a] if entry.name.isdigit() else []
            if args[-2:] != [str(VENV_BIN / "cyclegan").encode(), b"train"]:
                continue
            env = proc_env(int(entry.name))
            if env.get("SLURM_CONF") != str(conf):
                continue
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.endswith(".lock") and "/checkpoints/" in target:
                    found[int(entry.name)] = (env["SLURM_ARRAY_TASK_ID"], Path(target[: -len(".lock")]))
        except (OSError, IndexError, KeyError):
            continue
    return found


def task_logs(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((folder / "logs").glob("*.log"))}


def failure(cluster, job: str, folder: Path) -> str:
    logs = task_logs(folder)
    return f"{cluster.states(job)}\n" + "".join(f"--- {name}\n{text[-4000:]}\n" for name, text in logs.items()) + \
        cluster.log()


def stop_one_after_its_first_checkpoint(cluster, job: str, folder: Path) -> tuple[int, str, list[str]]:
    """The first task's `cyclegan train` that has written a checkpoint, stopped (SIGSTOP) at once:
    (pid, array task id, its checkpoint files then)."""
    next_look = time.monotonic()

    def caught():
        nonlocal next_look
        for pid, (task, run_folder) in training_processes(cluster.conf).items():
            checkpoints = sorted(p.name for p in run_folder.glob("step_*.pt"))
            if checkpoints:
                os.kill(pid, signal.SIGSTOP)
                return pid, task, checkpoints
        if time.monotonic() > next_look:  # every second, whether the tasks have ended without training
            next_look = time.monotonic() + 1
            assert not set(cluster.states(job).values()) <= TERMINAL, failure(cluster, job, folder)
        return None

    return wait_for(caught, 600, "a training task's first checkpoint", poll=0.05)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, s3_server):
    """The sweep submitted, task caught mid-training requeued, and all tasks finished."""
    base = tmp_path_factory.mktemp("sweep")
    s3 = s3_server
    dvc_bucket, mlflow_bucket = create_bucket(s3, "sweep-dvc"), create_bucket(s3, "sweep-mlflow")
    with slurm_cluster() as cluster, \
            mlflow_server(base / "mlflow", f"sqlite:///{base / 'mlflow.db'}", s3, admin=ADMIN,
                          bucket=mlflow_bucket) as tracking:
        origin = base / "origin.git"
        repo, env = project(base, origin, dvc_remote=f"s3://{dvc_bucket}/store", endpoint=s3.endpoint)
        # What a user's shell exports: the servers' URLs and keys, nothing of it in a file.
        env = cluster.env({**env, **s3.env(), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": tracking.url,
                           "MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1]})
        scratch = base / "scratch"
        started = time.monotonic()
        submitted = run(sweep_cmd("-S", GRID, "--scratch", str(scratch), "--name", "grid", "--max-parallel", "2",
                                   "--", "--time=30", "--partition=test"), repo, env)
        job = submitted.stderr.split("submitted job ")[1].split(":")[0]
        folder = scratch / "grid"
        pid, task, checkpoints = stop_one_after_its_first_checkpoint(cluster, job, folder)
        # Killed mid-training and put back in the queue, as preemption or a lost node does.
        cluster.run("scontrol", "requeue", f"{job}_{task}")
        wait_for(lambda: cluster.states(job).get(task) == "PENDING", 60, f"task {task} to be requeued", poll=0.5)
        # Now, not after SLURM's 2 minutes; but in a later second than the requeue: slurmd refuses a
        # job whose credential is from the second its previous one was revoked in.
        time.sleep(2)
        cluster.run("scontrol", "update", f"JobId={job}_{task}", "StartTime=now")
        try:
            wait_for(lambda: set(cluster.states(job).values()) <= TERMINAL, 900, f"job {job}'s tasks", poll=2)
        except pytest.fail.Exception as timeout:
            pytest.fail(f"{timeout}\n{failure(cluster, job, folder)}")
        seconds = time.monotonic() - started
        assert set(cluster.states(job).values()) == {"COMPLETED"}, failure(cluster, job, folder)
        logs = task_logs(folder)
        print(f"sweep of 2 tasks (one requeued): {seconds:.0f} s from submission to the end")
        yield {"repo": repo, "env": env, "origin": origin, "folder": folder, "logs": logs, "task": task,
               "checkpoints": checkpoints, "submitted": submitted, "tracking": tracking, "s3": s3, "base": base,
               "cluster": cluster}


NAMES = ["grid-lambda_cycle=5", "grid-lambda_cycle=10"]


@pytest.mark.slow
def test_each_task_runs_the_commits_code_and_a_requeued_one_resumes(sweep):
    script = (sweep["folder"] / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-1%2\n" in script and "#SBATCH --time=30\n" in script, script
    logs = sweep["logs"]
    assert sorted(logs) == ["task-0.log", "task-1.log"], sorted(logs)
    for i, name in enumerate(NAMES):
        log = logs[f"task-{i}.log"]
        assert f"experiment {name} pushed" in log and MARKER in log, log[-3000:]
    requeued = logs[f"task-{sweep['task']}.log"]
    assert "restart 1" in requeued, requeued[-3000:]
    after = requeued.split("restart 1")[1]
    # The restarted task continues the training it was killed in, from a checkpoint it had written.
    assert "cyclegan train: resuming from" in after, after[-3000:]
    resumed_from = after.split("cyclegan train: resuming from ")[1].split(" ")[0]
    assert resumed_from.startswith(str(sweep["folder"] / "checkpoints")), resumed_from  # the sweep's shared folder


@pytest.mark.slow
def test_a_fresh_clone_pulls_both_experiments_and_compare_shows_both_runs(sweep, tmp_path, monkeypatch):
    import mlflow

    env = sweep["env"]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    client = mlflow.MlflowClient(tracking_uri=sweep["tracking"].url)
    runs = client.search_runs([client.get_experiment_by_name("cyclegan").experiment_id])
    # One run per experiment: the requeued task went on logging into the run it had started.
    assert sorted((r.info.run_name, r.info.status) for r in runs) == sorted((n, "FINISHED") for n in NAMES), runs
    assert client.search_runs(["0"]) == []  # nothing in "Default"
    clone = tmp_path / "laptop"
    run(["git", "clone", "-q", "--branch", "main", str(sweep["origin"]), str(clone)], tmp_path, env)
    run([DVC, "exp", "pull", "origin", *NAMES], clone, env)
    shown = json.loads(run([DVC, "exp", "show", "--json"], clone, env).stdout)
    experiments = {e["name"]: e["revs"][0]["data"] for rev in shown for e in (rev.get("experiments") or [])}
    assert sorted(experiments) == sorted(NAMES), list(experiments)
    for name, value in zip(NAMES, (5, 10)):
        data = experiments[name]
        assert data["params"]["params.yaml"]["data"]["lambda_cycle"] == value
        assert {"fid_A2B", "kid_A2B", "fid_B2A", "kid_B2A"} <= set(data["metrics"]["metrics/eval.json"]["data"])
    run([DVC, "exp", "apply", NAMES[1]], clone, env)  # its outputs came from the DVC remote
    run([DVC, "checkout"], clone, env)
    assert (clone / "models/G_A.safetensors").exists()

    compared = run([CYCLEGAN, "compare", "--source", "mlflow", "--param", "lambda_cycle"], clone, env)
    assert "2 experiments in 2 settings" in compared.stderr, compared.stderr
    # compare tagged each server run with the commit of the experiment this clone pulled.
    assert "2 MLflow runs tagged with their dvc exp commit" in compared.stderr, compared.stderr


def resubmit_task_0(sweep) -> tuple[str, str]:
    """`sbatch --array=0 sweep.sbatch`, as a user reruns one task: (its final state, what it logged)."""
    cluster, folder = sweep["cluster"], sweep["folder"]
    log = folder / "logs" / "task-0.log"
    before = len(log.read_text())
    job = run([shutil.which("sbatch", path="/usr/bin:/usr/local/bin") or "sbatch", "--parsable", "--array=0",
               str(folder / "sweep.sbatch")], sweep["repo"], sweep["env"]).stdout.strip().split(";")[0]
    wait_for(lambda: set(cluster.states(job).values()) <= TERMINAL, 300, f"job {job}", poll=1)
    return cluster.states(job)["0"], log.read_text()[before:]


@pytest.mark.slow
def test_a_resubmitted_task_only_pushes_and_leaves_a_busy_clone_alone(sweep):
    with open(sweep["folder"] / f"{NAMES[0]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a task still running in that clone holds it
        state, log = resubmit_task_0(sweep)
    assert state == "FAILED" and f"another task is running {NAMES[0]}" in log, (state, log)
    state, log = resubmit_task_0(sweep)
    assert state == "COMPLETED", (state, log)
    assert f"experiment {NAMES[0]} exists (an earlier run of this task); pushing it" in log, log
    assert "Running stage" not in log, log


@pytest.mark.slow
def test_credentials_are_in_no_script_log_clone_or_git_history(sweep):
    secrets = [ADMIN[1], sweep["s3"].secret_key, sweep["s3"].access_key]
    places = [p for p in sweep["folder"].rglob("*") if p.is_file() and not p.is_symlink()]
    places += [p for p in sweep["origin"].rglob("*") if p.is_file()]
    assert len(places) > 100, len(places)  # the clones, their caches, logs and the script
    leaked = [str(p) for p in places for s in secrets if s.encode() in p.read_bytes()]
    assert leaked == [], leaked
    assert all(s not in sweep["submitted"].stdout + sweep["submitted"].stderr for s in secrets)
