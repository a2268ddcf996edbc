"""`cyclegan log-pending`: send to the MLflow tracking server what `train` kept while the server
was unreachable (mlflow-pending/<run id>/, cyclegan.tracking_server); not a DVC stage.

The generators' MLflow models, when they are among it, are logged from models/ as `train` logs
them, after checking that models/ still holds the generators the run wrote.
"""
from __future__ import annotations

import sys

import numpy as np

from .. import generator_mlflow, paths, tracking, tracking_server
from ..config import Config
from ..prepared_data import PreparedDataset
from ..errors import UserError
from ..vocabulary import DIRECTIONS, TEST_SPLITS


def log_generators(cfg: Config, run_id: str) -> None:
    import mlflow

    run = mlflow.get_run(run_id)
    if run.data.tags.get(tracking.GENERATORS_TAG) != tracking.generators_sha256():
        raise UserError(f"models/ no longer holds the generators run {run_id} wrote; `dvc checkout` the "
                        f"commit of that run, then run `{tracking_server.LOG_PENDING_COMMAND}` again")
    data = PreparedDataset.of(cfg.data.dataset, TEST_SPLITS)
    step = max((m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "loss_G_A")), default=0)
    with mlflow.start_run(run_id=run_id):
        # As `train` logs them: each model's input example is the first test image of its source domain.
        examples = {d.name: np.array(data.array(d.source)[:1]) for d in DIRECTIONS}
        generator_mlflow.log_generators(mlflow, cfg, examples, step)


def main(cfg: Config, args=None) -> None:
    uri, root = tracking.tracking_uri(), paths.project_root()
    runs = tracking_server.pending_runs(root)
    if not runs:
        print(f"cyclegan log-pending: nothing kept in {root / tracking_server.PENDING}", file=sys.stderr)
        return
    tracking_server.check(uri, tracking.EXPERIMENT)
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    for run_id, records in runs:
        for i, record in enumerate(records):
            if record["call"] == "log_generators":
                log_generators(cfg, run_id)
            else:
                tracking_server.replay(client, run_id, record)
            tracking_server.mark_sent(root, run_id, records[i + 1:])
        print(f"cyclegan log-pending: run {run_id}: {tracking_server.describe(records)} logged",
              file=sys.stderr)
