"""MLflow tracking: one run per pipeline run or DVC experiment.

`train` creates the run and writes its id to models/mlflow_run.json (a small DVC output);
`evaluate` and `report` reattach to it. The default store is a sqlite file at the project root,
resolved to an absolute path: queued experiments run in copies under .dvc/tmp/exps and must log
into the same store. MLFLOW_TRACKING_URI overrides it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from . import paths
from .config import Config, flatten
from .fileio import write_json

EXPERIMENT = "cyclegan"
STORE = "mlflow.db"
_EXP_TMP = os.path.join(".dvc", "tmp", "exps")


def project_root() -> Path:
    """The project root, also from inside a queued experiment's copy under .dvc/tmp/exps/.

    DVC sets DVC_ROOT for stage commands (for queued experiments: the parent repo's root);
    outside DVC the path itself tells.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    text = str(cwd)
    marker = os.sep + _EXP_TMP + os.sep
    if marker in text:
        return Path(text.split(marker)[0])
    return cwd


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / STORE}"


def _quiet() -> None:
    # Alembic prints every migration when a new sqlite store is created.
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "none"


def run_tags(cfg: Config) -> dict[str, str]:
    return {
        "git_commit": _git_commit(),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_lock_sha256": _file_hash(Path("dvc.lock")),
        "dataset": cfg.data.dataset,
        # Which GPU a queue worker was given (README: Experiments); empty when not set.
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }


def run_params(cfg: Config) -> dict[str, Any]:
    params = flatten(cfg.to_dict())
    params["identity_weight_effective"] = cfg.identity_weight
    return params


def _mlflow():
    import mlflow  # imported lazily: it takes seconds and only tracking needs it

    _quiet()
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


@contextmanager
def _store_lock() -> Iterator[None]:
    """Hold <store>.lock while opening a sqlite store: MLflow creates and migrates the tables on
    first use, and two processes doing so at once (parallel queued experiments in a project
    without mlflow.db yet) fail with alembic errors. Later opens just wait for the first."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    try:
        f = open(db.with_name(db.name + ".lock"), "a")
    except OSError:  # no such folder: MLflow names the problem better
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _use_experiment(mlflow) -> None:
    with _store_lock():
        # With a sqlite store MLflow puts artifacts under the cwd of whoever creates the experiment
        # first; a queued experiment's cwd is a temp copy that DVC deletes. Pin them to the root.
        if mlflow.get_experiment_by_name(EXPERIMENT) is None and tracking_uri().startswith("sqlite:"):
            try:
                mlflow.create_experiment(EXPERIMENT, artifact_location=(project_root() / "mlruns").as_uri())
            except mlflow.exceptions.MlflowException:
                pass  # created meanwhile by a parallel queued experiment
        mlflow.set_experiment(EXPERIMENT)


def read_run_id(path: Path = paths.MLFLOW_RUN) -> str | None:
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


@contextmanager
def start_training_run(cfg: Config, resume_run_id: str | None = None) -> Iterator[Any]:
    """Create (or, when resuming training, reopen) the run; its id goes to models/mlflow_run.json."""
    mlflow = _mlflow()
    _use_experiment(mlflow)
    run_name = os.environ.get("DVC_EXP_NAME") or None
    if resume_run_id:
        try:
            mlflow.get_run(resume_run_id)
        except Exception:  # a store that was deleted or moved: start a new run
            resume_run_id = None
    with mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else run_name) as run:
        if not resume_run_id:
            mlflow.log_params(run_params(cfg))
        mlflow.set_tags(run_tags(cfg))
        write_json(paths.MLFLOW_RUN, {"run_id": run.info.run_id, "tracking_uri": tracking_uri(),
                                      "experiment": EXPERIMENT})
        yield mlflow


def last_logged_step(mlflow, key: str) -> int:
    """The highest step of metric `key` in the active run, 0 if none.

    A resumed run repeats the steps between its checkpoint and the interruption; those already
    in MLflow are not logged twice (metric history is append-only).
    """
    history = mlflow.MlflowClient().get_metric_history(mlflow.active_run().info.run_id, key)
    return max((m.step for m in history), default=0)


@contextmanager
def reattach(cfg: Config) -> Iterator[Any]:
    """Reopen the run that `train` created; a fresh run if the id is missing or the store is gone."""
    mlflow = _mlflow()
    _use_experiment(mlflow)
    run_id = read_run_id()
    if run_id:
        try:
            mlflow.get_run(run_id)
        except Exception:
            run_id = None
    with mlflow.start_run(run_id=run_id, run_name=os.environ.get("DVC_EXP_NAME") or None):
        if run_id is None:
            mlflow.log_params(run_params(cfg))
        mlflow.set_tags(run_tags(cfg))
        yield mlflow
