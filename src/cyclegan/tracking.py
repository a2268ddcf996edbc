"""MLflow tracking: one run per pipeline run or DVC experiment.

`train` creates the run and, once the generators are written, tags it with their content hash;
`evaluate` and `report` reattach to the run whose tag matches the generators in models/ (in a DVC
experiment, preferably the run of that experiment). No run id lives in a DVC output, so a return
to an earlier experiment's outputs (`git checkout`, `dvc checkout`) leaves nothing stale, and the
outputs stay a function of data, params and code. The default store is a sqlite file at the project root,
resolved to an absolute path: queued experiments run in copies under .dvc/tmp/exps and must log
into the same store. MLFLOW_TRACKING_URI overrides it.

What reproduces a run is on it: the params, the prepared dataset as an MLflow dataset input (its
content hash as the digest), the git commit, the DVC experiment's name and baseline commit, the
hashes of dvc.lock and requirements.lock, and CPU, memory (and GPU) use during training as MLflow
system metrics. The commit `dvc exp` makes for an experiment exists only once all its stages have
run, so no stage can record it: `link_experiment_commits` adds it afterwards (`cyclegan compare`
calls it).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import numpy as np

from . import paths, tracking_server
from .config import Config, flatten
from .errors import UserError

EXPERIMENT = "cyclegan"
STORE = "mlflow.db"
REQUIREMENTS_LOCK = "requirements.lock"
EXP_COMMIT_TAG = "dvc_exp_commit"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.project_root() / STORE}"


def _quiet() -> None:
    # Alembic prints every migration when a new sqlite store is created.
    # The system metrics monitor announces its start, its stop and the absence of a GPU.
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.system_metrics"):
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
        # Set by `dvc exp run` (queued or not): with the name, it finds the experiment's commit.
        "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "dvc_lock_sha256": _file_hash(Path("dvc.lock")),
        "requirements_lock_sha256": _file_hash(Path(REQUIREMENTS_LOCK)),
        "dataset": cfg.data.dataset,
        # Which GPU a queue worker was given (README: Experiments); empty when not set.
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }


def run_params(cfg: Config) -> dict[str, Any]:
    params = flatten(cfg.to_dict())
    params["identity_weight_effective"] = cfg.identity_weight
    return params


def _mlflow():
    uri = tracking_uri()
    # A remote server is asked first, in seconds: MLflow would retry for minutes, then fail.
    tracking_server.check(uri, EXPERIMENT)
    import mlflow  # imported lazily: it takes seconds and only tracking needs it

    _quiet()
    mlflow.set_tracking_uri(uri)
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
                mlflow.create_experiment(EXPERIMENT,
                                         artifact_location=(paths.project_root() / "mlruns").as_uri())
            except mlflow.exceptions.MlflowException:
                pass  # created meanwhile by a parallel queued experiment
        experiment = mlflow.set_experiment(EXPERIMENT)
        # When a parallel process (a sweep's other task on a new server) creates the experiment
        # between its look-up and its creation, MLflow's set_experiment returns it without making it
        # the active one (3.17), and the run would go to "Default"; by id it always does.
        mlflow.set_experiment(experiment_id=experiment.experiment_id)


def sample_image_key(direction: str) -> str:
    """The MLflow image key of a direction's sample grids (logged with step = epoch)."""
    return f"samples_{direction}"


def logged_images(client, run_id: str) -> list[tuple[str, int, str]]:
    """(key, step, artifact path) of the run's keyed full-size images, by key and step.

    MLflow stores them as images/<key>+step+<step>+timestamp+<ms>+<uuid>.png (its UI reads the
    key and step back from that name), beside a +compressed.webp preview.
    """
    out = []
    for artifact in client.list_artifacts(run_id, "images"):
        name = artifact.path.rsplit("/", 1)[-1]
        fields = name.rsplit(".", 1)[0].split("+")
        if name.endswith(".png") and len(fields) == 6 and fields[1] == "step":
            out.append((fields[0].replace("~", "/"), int(fields[2]), artifact.path))
    return sorted(out)


GENERATORS_TAG = "generators_sha256"


def generators_sha256() -> str | None:
    """One hash of models/G_A and G_B's bytes; None while either is missing."""
    digest = hashlib.sha256()
    for name, path in sorted(paths.GENERATORS.items()):
        if not path.is_file():
            return None
        digest.update(name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def tag_generators(mlflow) -> None:
    """Mark the active run as the one that wrote the generators now in models/."""
    mlflow.set_tag(GENERATORS_TAG, generators_sha256() or "")


def find_training_run(mlflow) -> str | None:
    """The run that wrote the generators in models/: of this DVC experiment if it has one, else the latest."""
    digest = generators_sha256()
    if digest is None:
        return None
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=f"tags.{GENERATORS_TAG} = "
                                                                           f"'{digest}'",
                              order_by=["attributes.start_time DESC"], output_format="list")
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    candidates = [r for r in runs if exp_name and r.data.tags.get("dvc_exp_name") == exp_name] or runs
    return candidates[0].info.run_id if candidates else None


@contextmanager
def start_training_run(cfg: Config, resume_run_id: str | None = None) -> Iterator[Any]:
    """Create (or, when resuming training, reopen) the run."""
    mlflow = _mlflow()
    _use_experiment(mlflow)
    run_name = os.environ.get("DVC_EXP_NAME") or None
    if resume_run_id:
        try:
            mlflow.get_run(resume_run_id)
        except Exception:  # a store that was deleted or moved: start a new run
            resume_run_id = None
    # CPU, memory, disk, network, and NVIDIA GPUs where nvidia-ml-py finds one, every 10 s
    # (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL): what a run's speed depended on.
    with ExitStack() as stack:
        if tracking_server.is_remote(tracking_uri()):
            # A server may go away during hours of training: the run's logging is kept meanwhile.
            logger = stack.enter_context(
                tracking_server.surviving_outages(mlflow, resume_run_id, run_name, paths.project_root()))
        else:
            stack.enter_context(mlflow.start_run(run_id=resume_run_id,
                                                 run_name=None if resume_run_id else run_name,
                                                 log_system_metrics=True))
            logger = mlflow
        if not resume_run_id:
            logger.log_params(run_params(cfg))
        logger.set_tags(run_tags(cfg))
        yield logger


def last_logged_step(mlflow, key: str) -> int:
    """The highest step of metric `key` in the active run, 0 if none.

    A resumed run repeats the steps between its checkpoint and the interruption; those already
    in MLflow are not logged twice (metric history is append-only).
    """
    history = mlflow.MlflowClient().get_metric_history(mlflow.active_run().info.run_id, key)
    return max((m.step for m in history), default=0)


@contextmanager
def reattach(cfg: Config) -> Iterator[Any]:
    """Reopen the run that wrote models/' generators; a fresh run where the store has none (a
    store deleted or moved, generators from `dvc pull`)."""
    mlflow = _mlflow()
    _use_experiment(mlflow)
    run_id = find_training_run(mlflow)
    with mlflow.start_run(run_id=run_id, run_name=os.environ.get("DVC_EXP_NAME") or None):
        if run_id is None:
            mlflow.log_params(run_params(cfg))
            tag_generators(mlflow)  # so that `report` after `evaluate` finds this run
        mlflow.set_tags(run_tags(cfg))
        yield mlflow


def log_dataset(mlflow, name: str, root: Path, manifest: dict[str, Any],
                shapes: dict[str, tuple[int, ...]]) -> None:
    """The prepared data the run trains on, as the run's "training" dataset input.

    A dataset input, not a tag, so the MLflow UI lists it with the run and finds every run of
    the same data by its digest: the prepared manifest's content hash (of every array), cut to 32
    hex digits (MLflow keeps 36 characters at most); the whole hash is an input tag. A resumed run
    logs the same input again, which MLflow keeps once.
    """
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    content = str(manifest.get("content_sha256") or "")
    if not content:
        raise UserError(f"{root / 'manifest.json'}: no content_sha256; run `dvc repro prepare` again")
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, *shape[1:]), name=split)
                     for split, shape in shapes.items()])
    # Named "local" outright: resolving a path finds two equivalent local source types, with a warning.
    # The path in the project, not the absolute one: a queued experiment runs in a temp copy.
    source = get_dataset_source_from_json(json.dumps({"uri": str(root)}), source_type="local")
    dataset = MetaDataset(source, name=name, digest=content[:32], schema=schema)
    counts = {f"n_{split}": str(shape[0]) for split, shape in shapes.items()}
    mlflow.log_input(dataset, context="training", tags={"content_sha256": content, **counts})


def experiment_commits(repo: Path | str = ".") -> dict[tuple[str, str], str]:
    """(baseline commit, experiment name) -> the commit `dvc exp` made for it, from the refs DVC
    keeps: refs/exps/<baseline[:2]>/<baseline[2:]>/<name>."""
    try:
        out = subprocess.run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps/"],
                             cwd=repo, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        sha, ref = line.split(" ", 1)
        parts = ref.split("/")
        if len(parts) == 5:  # refs/exps/stash and other DVC internals have other shapes
            found[(parts[2] + parts[3], parts[4])] = sha
    return found


def link_experiment_commits(repo: Path | str = ".", uri: str | None = None) -> int:
    """Tag each run of a DVC experiment with the commit `dvc exp` made for it (tag dvc_exp_commit),
    where `repo` has that commit and the run has no such tag yet; the number of runs tagged.

    An experiment run again under the same name (`dvc exp run -f -n NAME`) moves its ref: link
    before that, or the earlier run is tagged with the later commit.
    """
    commits = experiment_commits(repo)
    uri = uri or tracking_uri()
    if not commits or (uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()):
        return 0  # opening a missing sqlite store would create it
    from mlflow import MlflowClient

    _quiet()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return 0
    tagged, token = 0, None
    while True:
        page = client.search_runs([experiment.experiment_id], filter_string="tags.dvc_exp_name != ''",
                                  max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            sha = commits.get((tags.get("dvc_exp_baseline_rev", ""), tags.get("dvc_exp_name", "")))
            if sha and not tags.get(EXP_COMMIT_TAG):
                client.set_tag(run.info.run_id, EXP_COMMIT_TAG, sha)
                tagged += 1
        token = page.token
        if not token:
            return tagged
