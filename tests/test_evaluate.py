"""`cyclegan evaluate` with real torch-fidelity feature extraction on tiny sets (CPU, 32 px images).

Inception at 299x299 is the cost (~0.1-0.5 s per image on 2 cores), so the sets hold 5-8 images
and the real test sets' features are cached across calls, as in production.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cyclegan import fid_kid, paths
from cyclegan.config import config_from_dict
from cyclegan.errors import UserError
from cyclegan.stages import evaluate as ev
from cyclegan.datasets.toy import render_scene
from helpers import write_prepared

SIZE = 32


def cfg(**eval_overrides):
    return config_from_dict({"data": {"dataset": "toy_horse2zebra"},
                             "eval": {"batch_size": 8, "device": "cpu", **eval_overrides}})


def toy_test_sets(n: int, seed: int) -> dict[str, np.ndarray]:
    """testA/testB and their exact translations, as the embedded dataset renders them."""
    out: dict[str, list] = {"testA": [], "testB": [], "testA_target": [], "testB_target": []}
    for i in range(n):
        a, b = render_scene(np.random.default_rng([seed, 2, i]), SIZE)
        out["testA"].append(a)
        out["testA_target"].append(b)
        a, b = render_scene(np.random.default_rng([seed, 3, i]), SIZE)
        out["testB"].append(b)
        out["testB_target"].append(a)
    return {k: np.stack(v) for k, v in out.items()}


def write_project(root: Path, sets: dict[str, np.ndarray], a2b: np.ndarray | None, b2a: np.ndarray | None):
    """data/prepared/toy_horse2zebra in the prepare stage's format, and translations as translate writes them."""
    names = [f"{i:05d}.png" for i in range(len(sets["testA"]))]
    write_prepared(root, sets, {"testA": names, "testB": names})
    for direction, fakes in (("A2B", a2b), ("B2A", b2a)):
        if fakes is None:
            continue
        folder = root / paths.TRANSLATED / direction
        folder.mkdir(parents=True)
        for name, fake in zip(names, fakes):
            Image.fromarray(fake).save(folder / paths.translated_name(name))


def test_kid_subset_size_rule():
    assert fid_kid.kid_subset_size(6, 9) == 6
    assert fid_kid.kid_subset_size(5000, 1200) == 1000
    with pytest.raises(UserError, match="at least 2"):
        fid_kid.kid_subset_size(1, 10)


@pytest.mark.parametrize("n1,n2", [(12, 20), (150, 130)])
def test_frechet_distance_equals_torch_fidelity(n1, n2):
    """Our trace term (nuclear norm / symmetric root) against torch-fidelity's eigvals formula.

    64-d features keep torch-fidelity's general eigendecomposition fast; the identity holds for any
    dimension. (12, 20) takes the low-rank path, (150, 130) the symmetric d x d path.
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    import torch

    rng = np.random.default_rng(1)
    f1 = rng.normal(size=(n1, 64)).astype(np.float32)
    f2 = (rng.normal(size=(n2, 64)) * 1.3 + 0.4).astype(np.float32)
    reference = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(f1)),
                                         fid_features_to_statistics(torch.from_numpy(f2)), False)
    # rel 1e-6: torch-fidelity takes the mean in float32 (np.mean of float32 features), we in
    # float64; measured differences are ~4e-8 relative.
    assert fid_kid.frechet_distance(f1, f2) == pytest.approx(reference["frechet_inception_distance"], rel=1e-6)
    assert fid_kid.frechet_distance(f1, f1) == pytest.approx(0, abs=1e-9)


def test_fid_kid_of_arrays(inception_cache):
    sets = toy_test_sets(8, seed=11)
    real = sets["testB"]
    config = cfg()
    same = fid_kid.fid_kid(real.copy(), real, config)
    # Colour-inverted: a clearly different distribution (milder shifts are lost in KID's noise at
    # 8 images).
    shifted = fid_kid.fid_kid(255 - real, real, config)

    for scores in (same, shifted):
        assert all(math.isfinite(v) for v in scores.values())
        assert scores["kid_subset_size"] == 8
    # Identical sets: FID is zero up to rounding (the features are bit-identical).
    assert same["fid"] == pytest.approx(0, abs=1e-6)
    assert shifted["fid"] > 1.0
    # KID's unbiased estimate of identical 8-image sets is about -0.05 (the kernel's diagonal
    # enters only the cross term); the inverted set scores ~0.085.
    assert shifted["kid"] > 0 and shifted["kid"] > same["kid"] + 0.05

    scorer = fid_kid._scorer(config.eval)
    cached = scorer.cache_root / f"{scorer.cache_name(real)}-inception-v3-compat-features-2048.pt"
    assert cached.is_file()
    # Two calls, each extracting its 8 fakes; the real set went through the network once.
    assert scorer.images_extracted == 24


def test_ground_truth_errors_on_a_hand_made_case():
    inputs = np.zeros((1, 2, 2, 3), np.uint8)
    targets = inputs.copy()
    targets[0, 0, 0] = 255  # one of four pixels changes: the "object"
    identity = ev.ground_truth_errors(inputs, inputs, targets)
    assert identity["translation"] == identity["identity"]
    assert identity["identity"]["l1"] == pytest.approx(0.25)
    assert identity["identity"]["l1_object"] == pytest.approx(1.0)
    assert identity["identity"]["psnr"] == pytest.approx(10 * math.log10(1 / 0.25))
    perfect = ev.ground_truth_errors(inputs, targets, targets)["translation"]
    assert perfect == {"l1": 0.0, "psnr": pytest.approx(100.0), "l1_object": 0.0}
    half = targets.copy()
    half[0, 0, 0] = 51  # 0.2 on the [0, 1] scale, i.e. 0.8 away from the target
    assert ev.ground_truth_errors(inputs, half, targets)["translation"]["l1_object"] == pytest.approx(0.8)


def test_evaluate_writes_metrics_logs_mlflow_and_reuses_real_features(inception_cache, project):
    import mlflow

    n = 5
    sets = toy_test_sets(n, seed=7)
    # A2B "translates" by copying its input; B2A returns the exact targets.
    write_project(project, sets, a2b=sets["testA"], b2a=sets["testB_target"])
    config = cfg()

    first = fid_kid.InceptionScorer.from_config(config.eval)
    result = ev.evaluate(config, first)
    ev.log_to_mlflow(config, result)
    # Two real sets, two translated sets, each through torch-fidelity's resize and clean-fid's.
    assert first.images_extracted == 2 * 4 * n

    assert json.loads((project / paths.EVAL_DETAILS).read_text()) == result
    # The DVC metrics: what experiments are compared by, nothing of the protocol.
    assert json.loads((project / paths.EVAL_METRICS).read_text()) == {k: result[k] for k in ev.HEADLINE}
    flat = {k: v for k, v in result.items() if k != "protocol"}
    for key in ("fid_A2B", "kid_A2B", "kid_std_A2B", "fid_B2A", "kid_B2A", "kid_std_B2A", "fid_baseline",
                "kid_baseline", "kid_std_baseline", "gt_l1_A2B", "gt_psnr_A2B", "gt_l1_B2A", "gt_l1_identity",
                "gt_l1_identity_B2A", "gt_l1_object_A2B", "gt_l1_object_identity", "cleanfid_A2B", "cleanfid_B2A",
                "cleanfid_baseline", "precision_A2B", "recall_A2B", "precision_B2A", "recall_baseline"):
        assert key in flat
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())

    # Copying the input is exactly the baseline, by FID/KID and by ground truth.
    assert result["fid_A2B"] == pytest.approx(result["fid_baseline"], rel=1e-6)
    assert result["kid_A2B"] == pytest.approx(result["kid_baseline"], rel=1e-6, abs=1e-9)
    assert result["cleanfid_A2B"] == pytest.approx(result["cleanfid_baseline"], rel=1e-6)
    assert (result["precision_A2B"], result["recall_A2B"]) == (result["precision_baseline"], result["recall_baseline"])
    assert result["gt_l1_A2B"] == result["gt_l1_identity"] > 0
    assert result["gt_l1_object_A2B"] == result["gt_l1_object_identity"] > result["gt_l1_identity"]
    assert result["gt_l1_B2A"] == 0 and result["gt_psnr_B2A"] == pytest.approx(100)
    assert result["fid_B2A"] > 0

    protocol = result["protocol"]
    assert protocol["counts"] == {"testA": n, "testB": n, "A2B": n, "B2A": n}
    assert protocol["kid_subset_size"] == {"A2B": n, "B2A": n, "baseline": n}
    assert protocol["image_size"] == [SIZE, SIZE]
    assert protocol["weights"]["kind"] == "converted"
    assert protocol["weights"]["sha256"] == first.weights.sha256
    assert protocol["implementation"].startswith("torch-fidelity ")
    assert protocol["literature"]["cleanfid_mode"] == "clean"
    assert protocol["literature"]["prc_neighborhood_k"] == 3

    runs = mlflow.search_runs(experiment_names=["cyclegan"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["fid_A2B"] == pytest.approx(result["fid_A2B"])
    assert run.data.metrics["gt_l1_identity"] == pytest.approx(result["gt_l1_identity"])
    assert run.data.tags["inception_weights"] == f"converted:{first.weights.sha256[:12]}"
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)]
    assert "eval.json" in artifacts and "eval_details.json" in artifacts

    # Re-evaluating reads the real test sets' features from the cache: only translations run.
    cached = [first.cache_root / f"{first.cache_name(sets[s])}-inception-v3-compat-features-2048.pt"
              for s in ("testA", "testB")]
    mtimes = [p.stat().st_mtime_ns for p in cached]
    second = fid_kid.InceptionScorer.from_config(config.eval)
    again = ev.evaluate(config, second)
    assert second.images_extracted == 2 * 2 * n
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    assert again == result


def test_missing_inputs_are_one_line_errors(project):
    config = cfg()
    manifest = paths.PREPARED / "toy_horse2zebra" / "manifest.json"
    with pytest.raises(UserError, match=re.escape(str(manifest)) + ".*dvc repro"):
        ev.evaluate(config)

    sets = toy_test_sets(3, seed=5)
    write_project(project, sets, a2b=None, b2a=None)
    with pytest.raises(UserError, match=re.escape(str(paths.TRANSLATED / "A2B")) + ".*dvc repro translate"):
        ev.evaluate(config)

    a2b_folder = project / paths.TRANSLATED / "A2B"
    a2b_folder.mkdir(parents=True)
    Image.fromarray(sets["testA"][0]).save(a2b_folder / "00000.png")
    with pytest.raises(UserError, match=r"00001\.png: missing \(2 of 3 translations\).*dvc repro"):
        ev.evaluate(config)


def test_translations_of_another_size_are_resized(tmp_path):
    folder = tmp_path / "A2B"
    folder.mkdir()
    Image.new("RGB", (40, 48), (10, 20, 30)).save(folder / "a.png")
    Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).save(folder / "b.png")
    images, resized = ev.load_translations(folder, ["a.jpg", "b.png"], (SIZE, SIZE))
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert resized == 1
    assert (images[0] == (10, 20, 30)).all() and (images[1] == (1, 2, 3)).all()
