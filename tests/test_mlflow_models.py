"""The generators as MLflow models of the training run, and what else the run carries.

One tiny training (helpers.make_project) with `tracking.register_as`, in a tmp project with its
own sqlite store; the logged models are loaded with `mlflow.pyfunc.load_model` and served by a
real `mlflow models serve` (local env, 127.0.0.1), and compared with `cyclegan translate`.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cyclegan import paths
from cyclegan.cli import main as cli_main
from cyclegan.config import ConfigError, config_from_dict
from cyclegan.generator_file import load_generator, translate_array
from helpers import (TRAIN_PARAMS, background_process, enter_project, free_port, http_ok, make_project, merge,
                     mlflow_client, run_id, run_train, tracking_uri, wait_for)

ROOT = Path(__file__).resolve().parents[1]
REGISTERED = "h2z-test"


@dataclass(frozen=True)
class Registered:
    root: Path
    run_id: str
    models: dict  # "G_A"/"G_B" -> the LoggedModel


@pytest.fixture(autouse=True)
def sys_path_restored():
    """Loading a model puts its bundled copy of cyclegan on sys.path, where the worker processes of
    later tests (prepare's pool) would import it instead of the package under test."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Registered:
    """`cyclegan train` (2 epochs of 12 steps) registering G_A, sampling system metrics every 0.5 s."""
    import mlflow

    root = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as mp:
        enter_project(mp, root)
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
        make_project(root, tracking={"register_as": REGISTERED})
        (root / "requirements.lock").write_text("torch==2.14.1\n")
        run_train()
        rid = run_id()
        run = mlflow_client().get_run(rid)
        models = {m.name: m for m in (mlflow_client().get_logged_model(o.model_id) for o in run.outputs.model_outputs)}
        mlflow.set_tracking_uri(None)
    return Registered(root, rid, models)


@pytest.fixture
def in_project(registered, monkeypatch) -> Registered:
    import mlflow

    enter_project(monkeypatch, registered.root)
    mlflow.set_tracking_uri(tracking_uri(registered.root))
    yield registered
    mlflow.set_tracking_uri(None)


def model_dir(model) -> Path:
    return Path(model.artifact_location.removeprefix("file://"))


def test_both_generators_are_models_of_the_run(in_project):
    import mlflow

    models = in_project.models
    assert set(models) == {"G_A", "G_B"}
    for name, direction, split in (("G_A", "A2B", "testA"), ("G_B", "B2A", "testB")):
        model = models[name]
        assert model.source_run_id == in_project.run_id
        # The architecture, as the generator file states it.
        assert model.params["direction"] == direction
        assert model.params["model.netG"] == "resnet_6blocks" and model.params["model.ngf"] == "8"
        folder = model_dir(model)
        # The weights are the generator file itself; no pickle anywhere in the model.
        weights = folder / "artifacts" / paths.GENERATORS[name].name
        assert weights.read_bytes() == paths.GENERATORS[name].read_bytes()
        assert not list(folder.rglob("*.pkl"))
        assert (folder / "code" / "cyclegan" / "generator_file.py").is_file()
        info = mlflow.models.get_model_info(f"models:/{model.model_id}")
        assert info.metadata["direction"] == direction and info.metadata["model"]["ngf"] == 8
        spec = info.signature.inputs.inputs[0]
        assert (spec.type, spec.shape) == (np.dtype(np.uint8), (-1, -1, -1, 3))
        assert info.signature.outputs.inputs[0].shape == (-1, -1, -1, 3)
        example = json.loads((folder / "input_example.json").read_text())
        first = np.load(paths.PREPARED / "toy_horse2zebra" / f"{split}.npy")[:1]
        assert np.array_equal(np.array(example, dtype=np.uint8), first)
        requirements = (folder / "requirements.txt").read_text().split()
        assert any(r.startswith("torch==") for r in requirements) and any(r.startswith("safetensors==") for r in requirements)


@pytest.mark.parametrize("name,split", [("G_A", "testA"), ("G_B", "testB")])
def test_pyfunc_model_translates_as_cyclegan_translate_does(in_project, tmp_path, name, split):
    import mlflow

    images = np.load(paths.PREPARED / "toy_horse2zebra" / f"{split}.npy")
    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    # At crop_size (28, the size of the test images): translate resizes nothing.
    assert cli_main(["translate", "--input", str(folder), "--output", str(tmp_path / "out"),
                     "--generator", str(paths.GENERATORS[name])]) == 0
    expected = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{i}.png")) for i in range(len(images))])

    model = mlflow.pyfunc.load_model(f"models:/{in_project.models[name].model_id}")
    translated = model.predict(images)
    assert translated.dtype == np.uint8 and translated.shape == images.shape
    assert np.array_equal(translated, expected)
    assert not np.array_equal(translated, images)


def test_pyfunc_model_refuses_sizes_the_generator_cannot_keep(in_project):
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{in_project.models['G_A'].model_id}")
    with pytest.raises(mlflow.exceptions.MlflowException, match="image size 26x28: .*multiples of 4"):
        model.predict(np.zeros((1, 26, 28, 3), np.uint8))


def test_register_as_registers_the_a2b_generator(in_project):
    import mlflow

    versions = mlflow_client().search_model_versions(f"name='{REGISTERED}'")
    assert [(int(v.version), v.run_id) for v in versions] == [(1, in_project.run_id)]
    assert versions[0].source == f"models:/{in_project.models['G_A'].model_id}"
    images = np.load(paths.PREPARED / "toy_horse2zebra" / "testA.npy")[:2]
    registered = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1").predict(images)
    logged = mlflow.pyfunc.load_model(f"models:/{in_project.models['G_A'].model_id}").predict(images)
    assert np.array_equal(registered, logged)


def test_register_as_is_checked_before_training():
    with pytest.raises(ConfigError, match=r"'tracking.register_as' is 'a/b': an MLflow model name has no '/'"):
        config_from_dict(merge(TRAIN_PARAMS, {"tracking": {"register_as": "a/b"}}))
    assert config_from_dict(merge(TRAIN_PARAMS, {"tracking": {"register_as": "h2z v2"}})).tracking.register_as == "h2z v2"


def test_the_run_carries_what_reproduces_it(in_project):
    client = mlflow_client()
    run = client.get_run(in_project.run_id)
    manifest = json.loads((paths.PREPARED / "toy_horse2zebra" / "manifest.json").read_text())
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == "toy_horse2zebra" and dataset.digest == manifest["content_sha256"][:32]
    assert json.loads(dataset.source) == {"uri": "data/prepared/toy_horse2zebra"}
    tags = {t.key: t.value for t in dataset_input.tags}
    assert tags["mlflow.data.context"] == "training" and tags["content_sha256"] == manifest["content_sha256"]
    assert (tags["n_trainA"], tags["n_trainB"], tags["n_testA"]) == ("12", "10", "4")
    assert run.data.params["model.ngf"] == "8" and run.data.params["tracking.register_as"] == REGISTERED
    lock = hashlib.sha256(Path("requirements.lock").read_bytes()).hexdigest()[:16]
    assert run.data.tags["requirements_lock_sha256"] == lock
    # Outside `dvc exp run` there is no experiment: empty, not missing.
    assert run.data.tags["dvc_exp_name"] == "" and run.data.tags["dvc_exp_baseline_rev"] == ""
    # MLflow's system metrics, sampled during training.
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        history = client.get_metric_history(run.info.run_id, key)
        assert history and all(m.value >= 0 for m in history), key


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.mark.slow
def test_mlflow_models_serve_translates_a_posted_image(in_project, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(in_project.root), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    serve = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{REGISTERED}/1",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    image = np.load(paths.PREPARED / "toy_horse2zebra" / "testA.npy")[1:2]
    # What `cyclegan translate` computes from the generator file.
    expected = translate_array(load_generator(paths.GENERATORS["G_A"], torch.device("cpu")), image, 1, torch.device("cpu"))
    log = tmp_path / "serve.log"
    with background_process(serve, log, env, cwd=tmp_path) as proc:
        wait_for(lambda: http_ok(f"{url}/ping") or proc.poll() is not None, 120, "mlflow models serve /ping")
        assert proc.poll() is None, log.read_text()[-3000:]
        status, answer = _post(f"{url}/invocations", {"inputs": image.tolist()})
        assert status == 200, answer
        assert np.array_equal(np.array(answer["predictions"], dtype=np.uint8), expected)
        status, answer = _post(f"{url}/invocations", {"inputs": image[:, :26].tolist()})
        assert status == 400 and "multiples of 4" in answer["message"]
