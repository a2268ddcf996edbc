"""A queued experiment that dies resumes when it is queued again.

Its checkpoints live in the project's own models/checkpoints/<fingerprint>/ (or $CYCLEGAN_CHECKPOINTS),
not in the copy under .dvc/tmp/exps that DVC deletes with the experiment. One process at a time
trains a run: a second one with the same fingerprint stops with one line.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from cyclegan import checkpoint, paths
from cyclegan.errors import UserError
from helpers import (TINY, VENV_BIN, make_project, merge, pipeline_repo, process_alive, run, run_dir, run_train,
                     wait_for,
                     wait_for_experiments)

DVC = str(VENV_BIN / "dvc")

# 4 epochs of 48 steps, a checkpoint every 8: long enough to be killed twice mid-train. The
# experiments run the pipeline up to `train`: what follows it has nothing to do with resuming.
PARAMS = merge(TINY, {
    "data": {"toy": {"n_train_a": 48, "n_train_b": 48, "n_test": 4}},
    "train": {"n_epochs": 2, "n_epochs_decay": 2, "checkpoint_every": 8, "log_every": 8, "device": "cpu"},
    "eval": {"batch_size": 4, "n_samples": 0, "device": "cpu"},
})


def _queue_state(repo: Path, env: dict, name: str) -> str:
    for line in run([DVC, "queue", "status"], repo, env).stdout.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == name:
            return parts[-1]
    return "missing"


def _queue_and_start(repo: Path, env: dict, name: str) -> None:
    run([DVC, "exp", "run", "--queue", "-n", name, "-S", "lambda_cycle=5", "train"], repo, env)
    # Not through pipes: the worker it starts would hold them open, and reading them to their end
    # would wait for the whole experiment.
    subprocess.run([DVC, "queue", "start", "-j", "1"], cwd=repo, env=env, check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _run_folder(repo: Path) -> Path:
    runs = wait_for(lambda: [d for d in (repo / paths.CHECKPOINTS).glob("*") if d.is_dir()], 300,
                    "the queued experiment's run folder in the project's models/checkpoints", poll=0.1)
    assert len(runs) == 1, runs
    return runs[0]


def _trainer(folder: Path) -> int:
    """The pid of the process training the run in `folder`, as its lock file names it."""
    holder = checkpoint.lock_path(folder).read_text().split()
    assert holder[0] == "pid", holder
    return int(holder[1])


def _wait_until_failed(repo: Path, env: dict, name: str, pid: int) -> None:
    """The training process gone (watched in /proc), then `name` Failed in the queue."""
    wait_for(lambda: not process_alive(pid), 120, f"`{name}`'s training process to end", poll=0.2)
    wait_for(lambda: _queue_state(repo, env, name) == "Failed", 120, f"`{name}` to stop", poll=2)


def _exp_ref(repo: Path, env: dict, name: str) -> str:
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], repo, env).stdout.split()
    return next(ref for ref in refs if ref.endswith(f"/{name}"))


def _generator_hashes(dvc_lock: str) -> dict[str, str]:
    """The md5 DVC recorded for each generator file the train stage wrote."""
    outs = yaml.safe_load(dvc_lock)["stages"]["train"]["outs"]
    hashes = {o["path"]: o["md5"] for o in outs if o["path"] in {str(p) for p in paths.GENERATORS.values()}}
    assert len(hashes) == 2, outs
    return hashes


@pytest.mark.slow
def test_a_killed_queued_experiment_resumes_when_queued_again(tmp_path):
    repo, env = pipeline_repo(tmp_path / "project", PARAMS)
    try:
        # 1. Killed like Ctrl-C (`dvc queue kill`) after its first checkpoint.
        _queue_and_start(repo, env, "first")
        folder = _run_folder(repo)
        wait_for(lambda: checkpoint.newest_step(folder) >= 8, 300, "the first checkpoint", poll=0.05)
        assert _queue_state(repo, env, "first") == "Running"
        pid = _trainer(folder)
        run([DVC, "queue", "kill", "first"], repo, env)
        _wait_until_failed(repo, env, "first", pid)
        killed_at = checkpoint.newest_step(folder)
        assert killed_at < 192, "the run ended before it was killed: nothing to resume"

        # 2. Queued again, and SIGKILLed (an out-of-memory kill, a preempted node) past that point:
        # the lock file names the training process.
        _queue_and_start(repo, env, "second")
        wait_for(lambda: checkpoint.newest_step(folder) > killed_at, 300, "a checkpoint past the first kill",
                 poll=0.05)
        pid = _trainer(folder)
        os.kill(pid, signal.SIGKILL)
        _wait_until_failed(repo, env, "second", pid)
        second_killed_at = checkpoint.newest_step(folder)
        assert killed_at < second_killed_at < 192
        second_log = run([DVC, "queue", "logs", "second"], repo, env).stdout
        assert f"resuming from {folder / f'step_{killed_at:09d}.pt'}" in second_log, second_log[-3000:]

        # 3. Queued a third time: it resumes and finishes.
        _queue_and_start(repo, env, "third")
        # The first two failed (no refs); DVC writes the ref, then cleans up: wait for Success.
        wait_for_experiments(repo, env, 1, 500, "`third` to finish", failed_before=("first", "second"))
        wait_for(lambda: _queue_state(repo, env, "third") != "Running", 120, "`third` to be done", poll=2)
        third_log = run([DVC, "queue", "logs", "third"], repo, env).stdout
        assert _queue_state(repo, env, "third") == "Success", third_log[-3000:]
        assert f"resuming from {folder / f'step_{second_killed_at:09d}.pt'}" in third_log, third_log[-3000:]
        # It trained only what was left.
        assert f"192 steps, {192 - second_killed_at} images in" in third_log, third_log[-3000:]
    finally:
        run([DVC, "queue", "stop", "--kill"], repo, env)
    resumed = _generator_hashes(run(["git", "show", f"{_exp_ref(repo, env, 'third')}:dvc.lock"], repo, env).stdout)

    # The same experiment uninterrupted, its training state in a folder of the user's choosing.
    elsewhere = tmp_path / "shared-fs" / "checkpoints"
    # -f: trained again, not restored from DVC's run cache, which the queued experiment filled.
    straight = run([DVC, "exp", "run", "-f", "-n", "straight", "-S", "lambda_cycle=5", "train"], repo,
                   {**env, paths.CHECKPOINTS_ENV: str(elsewhere)})
    assert "resuming" not in straight.stdout, straight.stdout[-3000:]
    assert [d.name for d in elsewhere.iterdir() if d.is_dir()] == [folder.name]
    assert checkpoint.newest_step(elsewhere / folder.name) == 192
    assert _generator_hashes((repo / "dvc.lock").read_text()) == resumed
    assert not list((repo / ".dvc/tmp/exps").glob("tmp*")), "a queued experiment's copy was left behind"


def test_a_second_process_training_the_same_run_stops_with_one_line(project):
    make_project(project, **TINY)
    run_train()
    folder = run_dir()  # relative: the checkpoints of a run in the working directory
    before = checkpoint.list_checkpoints(folder)
    with checkpoint.hold_run(folder), pytest.raises(UserError) as e:
        run_train(fresh=True)
    message = str(e.value)
    assert "\n" not in message
    assert str(folder) in message and f"pid {os.getpid()} on " in message and "Wait for it" in message
    assert checkpoint.list_checkpoints(folder) == before  # nothing written, nothing cleared
    # Once the first process is done the run is free again, and the lock file names nobody.
    assert checkpoint.lock_path(folder).read_text() == ""
    with checkpoint.hold_run(folder):
        assert checkpoint.lock_path(folder).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"

