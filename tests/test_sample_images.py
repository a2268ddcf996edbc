"""Sample grids in MLflow under a key and a step (the epoch), so that the image charts of MLflow's
compare page line up the grids of a sweep's runs epoch by epoch."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cyclegan import tracking
from helpers import make_project, mlflow_client, run_id, run_train


@pytest.mark.slow
def test_sample_grids_are_logged_with_key_and_epoch_step(project, tmp_path):
    make_project(project, n_a=4, n_b=4, train={"n_epochs": 1, "n_epochs_decay": 1}, eval={"n_samples": 2})
    run_train()
    client = mlflow_client()  # the project's real sqlite store (mlflow.db in tmp_path)
    run = client.get_run(run_id())
    assert run.data.tags.get("mlflow.loggedImages", "").lower() == "true"

    logged = tracking.logged_images(client, run.info.run_id)
    assert [(key, step) for key, step, _ in logged] == [("samples_A2B", 1), ("samples_A2B", 2),
                                                        ("samples_B2A", 1), ("samples_B2A", 2)]
    for key, step, path in logged:
        direction = key.removeprefix("samples_")
        keyed = client.download_artifacts(run.info.run_id, path, str(tmp_path / f"{key}-{step}"))
        named = client.download_artifacts(run.info.run_id, f"samples/{direction}/epoch_{step:04d}.png",
                                          str(tmp_path / f"named-{key}-{step}"))
        with Image.open(keyed) as a, Image.open(named) as b:
            # The same grid as the epoch's named file: this key and step hold this epoch's picture.
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The two epochs' grids differ (the generators trained in between).
    with Image.open(client.download_artifacts(run.info.run_id, logged[0][2], str(tmp_path / "e1"))) as first, \
            Image.open(client.download_artifacts(run.info.run_id, logged[1][2], str(tmp_path / "e2"))) as second:
        assert not np.array_equal(np.asarray(first), np.asarray(second))
