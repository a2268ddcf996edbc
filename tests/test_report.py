"""`cyclegan report` on a small but real project: toy test images, generators saved by the
save_generator `train` uses, metrics files in the stages' formats and a real MLflow sqlite store holding
this run (with per-epoch FID/KID) and a second run to compare with.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cyclegan import cli, paths, tracking
from cyclegan.config import config_from_dict
from cyclegan.image_tensors import to_tensor, to_uint8
from cyclegan.errors import UserError
from cyclegan.generator_file import load_generator, save_generator
from cyclegan.model import LOSS_TERMS
from cyclegan.networks import build_networks
from cyclegan.stages import report
from cyclegan.datasets.toy import render_scene
from helpers import enter_project, set_params, write_prepared

SIZE = 32
N_TEST = 5
N_SAMPLES = 3
PARAMS = {
    "lambda_identity": 0.5,
    "data": {"dataset": "toy_horse2zebra", "load_size": SIZE, "crop_size": SIZE},
    "model": {"netG": "resnet_6blocks", "ngf": 4, "ndf": 4},
    "train": {"n_epochs": 1, "n_epochs_decay": 1, "device": "cpu"},
    "eval": {"n_samples": N_SAMPLES, "device": "cpu", "batch_size": 4},
}
EVAL = {
    "fid_A2B": 123.456789, "kid_A2B": 0.0421337, "kid_std_A2B": 0.0031,
    "fid_B2A": 98.7654321, "kid_B2A": 0.0312345, "kid_std_B2A": 0.0022,
    "fid_baseline": 150.25, "kid_baseline": 0.0876, "kid_std_baseline": 0.004,
    "gt_l1_A2B": 0.0712345, "gt_l1_identity": 0.0456789,
    "cleanfid_A2B": 119.8765, "cleanfid_B2A": 95.4321, "cleanfid_baseline": 147.125,
    "precision_A2B": 0.625, "recall_A2B": 0.375, "precision_B2A": 0.875, "recall_B2A": 0.5,
    "precision_baseline": 0.25, "recall_baseline": 0.125,
    "protocol": {"counts": {"A2B": N_TEST, "testB": N_TEST}, "image_size": [SIZE, SIZE], "dataset": "toy_horse2zebra",
                 "implementation": "torch-fidelity 0.3.0", "feature_extractor": "inception-v3-compat",
                 "reference": {"A2B": "testB", "B2A": "testA", "baseline": "testA vs testB"},
                 "kid_subset_size": {"A2B": N_TEST, "B2A": N_TEST, "baseline": N_TEST}},
}
TRAIN = {"loss_G_A": 0.87654, "loss_D_A": 0.25}
PER_EPOCH = ((1, 180.0), (2, 140.0), (3, 150.0))  # as train scores them with train.eval_every: 1


def write_inputs(root: Path, cfg, *, preview: bool = True, per_epoch: bool = True) -> dict[str, np.ndarray]:
    """Every file the report stage reads, in the formats the other stages write."""
    sets = {"testA": [], "testB": []}
    for i in range(N_TEST):
        a, b = render_scene(np.random.default_rng([7, i]), SIZE)
        sets["testA"].append(a)
        sets["testB"].append(b)
    sets = {k: np.stack(v) for k, v in sets.items()}
    names = [f"{i:03d}.png" for i in range(N_TEST)]
    write_prepared(root, sets, {"testA": names, "testB": names})

    nets = build_networks(cfg.model, seed=3)
    save_generator(nets["G_A"], cfg.model, "A2B", root / paths.GENERATORS["G_A"])
    save_generator(nets["G_B"], cfg.model, "B2A", root / paths.GENERATORS["G_B"])

    (root / paths.METRICS).mkdir()
    (root / paths.TRAIN_METRICS).write_text(json.dumps(TRAIN))
    (root / paths.EVAL_METRICS).write_text(json.dumps({k: v for k, v in EVAL.items() if k != "protocol"}))
    (root / paths.EVAL_DETAILS).write_text(json.dumps(EVAL))
    with open(root / paths.TRAIN_LOSSES, "w", newline="") as f:
        fields = ["step", "epoch", "lr"] + [f"loss_{t}" for t in LOSS_TERMS]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for step in (2, 4, 6, 8):
            writer.writerow({"step": step, "epoch": 1 + step // 5, "lr": 2e-4,
                             **{f"loss_{t}": 1.0 / step + i for i, t in enumerate(LOSS_TERMS)}})
    with open(root / paths.TRAIN_EVAL, "w") as f:
        f.write("epoch,fid_A2B,fid_B2A,kid_A2B,kid_B2A\n")
        for epoch, fid in PER_EPOCH if per_epoch else ():
            f.write(f"{epoch},{fid},{fid - 20},{fid / 1000},{fid / 2000}\n")
    (root / paths.DATA_REPORT).write_text(json.dumps(
        {"counts": {"testA": {"found": N_TEST + 1, "used": N_TEST, "skipped": 1}}, "warnings": []}))
    if preview:
        (root / paths.REPORTS).mkdir()
        Image.new("RGB", (40, 20), (10, 200, 30)).save(root / paths.DATASET_PREVIEW)
    return sets


def start_run(cfg) -> str:
    """A run as `train` and `evaluate` leave it: tagged with the generators it wrote, scores logged."""
    with tracking.start_training_run(cfg) as mlflow:
        tracking.tag_generators(mlflow)
        mlflow.log_metrics({k: v for k, v in EVAL.items() if isinstance(v, float)})  # as evaluate does
        return mlflow.active_run().info.run_id


def other_run(lambda_identity: float, fid: float) -> None:
    """Another finished experiment in the store (of other generators), logged as train would."""
    cfg = config_from_dict({**PARAMS, "lambda_identity": lambda_identity})
    with tracking.start_training_run(cfg) as mlflow:
        mlflow.log_metrics({"fid_A2B": fid, "kid_A2B": 0.05, "fid_B2A": fid + 1, "kid_B2A": 0.06})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A project with every input, one comparison run, and the report built once."""
    root = tmp_path_factory.mktemp("report")
    cfg = config_from_dict(PARAMS)
    with pytest.MonkeyPatch.context() as mp:
        enter_project(mp, root)
        sets = write_inputs(root, cfg)
        run_id = start_run(cfg)
        other_run(0.0, 111.0)
        report.main(cfg)
        import mlflow

        client = mlflow.MlflowClient()
        artifacts = [a.path for a in client.list_artifacts(run_id, report.ARTIFACT_DIR)]
        logged = Path(client.download_artifacts(run_id, f"{report.ARTIFACT_DIR}/index.html", str(root / "logged")))
        yield {"root": root, "cfg": cfg, "sets": sets, "run_id": run_id, "artifacts": artifacts,
               "html": (root / report.REPORT).read_text(), "logged_html": logged.read_text()}


def test_page_is_self_contained(built):
    page = built["html"]
    assert page.startswith("<!DOCTYPE html>")
    # Nothing loaded from elsewhere: no URLs in src/href, no scripts or stylesheets by link.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    for src in images:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    # Preview, losses, per-epoch, two sample grids; the logged copy adds the comparison plot.
    assert len(images) == 5
    assert len(re.findall(r'<img src="data:image/png;base64,', built["logged_html"])) == 6


def test_page_has_every_section(built):
    page = built["html"]
    for anchor in ("dataset", "losses", "per-epoch", "samples", "metrics"):
        assert f'<section id="{anchor}">' in page, anchor
    for text in ("Protocol", "inception-v3-compat", "torch-fidelity 0.3.0", "testA vs testB",
                 "input (testA)", "reconstruction G_B(G_A(x))", "identity G_A(x)"):
        assert text in page, text
    # What only the MLflow store knows is in the copy logged to the run, not in the DVC output.
    assert built["run_id"] not in page and '<section id="experiments">' not in page
    logged = built["logged_html"]
    assert built["run_id"] in logged and '<section id="experiments">' in logged
    for anchor in ("dataset", "losses", "per-epoch", "samples", "metrics"):  # the rest is the same
        assert page.split(f'<section id="{anchor}">')[1].split("</section>")[0] == \
            logged.split(f'<section id="{anchor}">')[1].split("</section>")[0], anchor


def test_page_is_the_same_bytes_whatever_the_store_holds(built, monkeypatch):
    """reports/index.html is a DVC output: other runs, or another store, must not change it."""
    root = built["root"]
    with monkeypatch.context() as mp:
        enter_project(mp, root)
        other_run(0.5, 99.0)
        report.main(built["cfg"])
        assert (root / report.REPORT).read_text() == built["html"]
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'another.db'}")  # the run is not there
        report.main(built["cfg"])
        assert (root / report.REPORT).read_text() == built["html"]


def test_page_shows_metric_values(built):
    page = built["html"]
    for value in ("123.5", "0.04213", "98.77", "0.03123", "150.2", "0.07123", "0.04568", "0.8765"):
        assert f">{value}<" in page, value
    # Data report counts (found / used / skipped).
    assert f">{N_TEST + 1}<" in page


def test_page_sets_literature_scores_beside_published_ones(built):
    page = built["html"]
    row = page[page.index("<td>A2B</td>", page.index("Scores to set beside published ones")):].split("</tr>")[0]
    # legacy FID (= fid_A2B), clean-FID, precision, recall, in that order
    assert row.index(">123.5<") < row.index(">119.9<") < row.index(">0.625<") < row.index(">0.375<")
    assert "<td>cleanfid_A2B</td>" not in page  # in the table above, not again among "other" metrics
    for text in (">77.2<", ">75.17<", ">45.5<", ">43.71<", ">62.1<", "MMagic", "legacy_tensorflow",
                 f"{N_TEST} translated testA images against {N_TEST} real testB images at [32, 32] px"):
        assert text in page, text
    # The samples section names the MLflow image keys for comparing grids across runs.
    assert "<code>samples_A2B</code>" in page and "step = epoch" in page


def test_best_and_final_training_scores_are_labelled(built):
    page = (built["root"] / report.REPORT).read_text()
    row = page[page.index("<td>train_fid_A2B</td>"):].split("</tr>")[0]
    assert "140 (epoch 2)" in row and "150 (epoch 3)" in row
    assert "best (lowest) during training" in page and "final (last evaluation)" in page


def test_comparison_lists_both_runs(built):
    section = built["logged_html"].split('<section id="experiments">', 1)[1].split("</section>", 1)[0]
    assert f"{built['run_id'][:8]} (this run)" in section
    assert section.count("<tr>") == 3  # header + two runs
    assert ">111<" in section and ">123.5<" in section
    assert "lambda_identity" in section


def test_sample_grid_rows(built):
    """Rows of samples_A2B.png are x, G_A(x), G_B(G_A(x)), G_B(x), one column per test image."""
    root = built["root"]
    grid = np.asarray(Image.open(root / report.SAMPLE_PNG["A2B"]).convert("RGB"))
    pad, tile = 2, SIZE + 2
    assert grid.shape == (pad + 4 * tile, pad + N_SAMPLES * tile, 3)

    G_A = load_generator(root / paths.GENERATORS["G_A"], torch.device("cpu"))
    G_B = load_generator(root / paths.GENERATORS["G_B"], torch.device("cpu"))
    with torch.no_grad():
        x = to_tensor(built["sets"]["testA"][:N_SAMPLES])
        fake = G_A(x)
        expected = [x, fake, G_B(fake), G_B(x)]
    for row, images in enumerate(expected):
        for col, image in enumerate(to_uint8(images)):
            y0, x0 = pad + row * tile, pad + col * tile
            tile_pixels = grid[y0:y0 + SIZE, x0:x0 + SIZE].astype(int)
            # make_grid's PIL conversion truncates where to_uint8 rounds: off by at most 1.
            assert np.abs(tile_pixels - image).max() <= 1, (row, col)


def test_pngs_written_and_logged(built):
    root = built["root"]
    for path in (report.LOSS_PNG, report.EPOCH_PNG, *report.SAMPLE_PNG.values()):
        Image.open(root / path).verify()
    names = {Path(a).name for a in built["artifacts"]}
    assert names == {"index.html", "loss_curves.png", "fid_kid_per_epoch.png", "samples_A2B.png",
                     "samples_B2A.png"}


def test_optional_sections_are_skipped(project):
    """No preview, no per-epoch scores, a single run: the page still builds, without those parts."""
    cfg = config_from_dict(PARAMS)
    write_inputs(project, cfg, preview=False, per_epoch=False)
    start_run(cfg)
    report.EPOCH_PNG.parent.mkdir(exist_ok=True)
    report.EPOCH_PNG.write_bytes(b"left by an earlier report")
    report.main(cfg)
    page = (project / report.REPORT).read_text()
    assert '<section id="per-epoch">' not in page and '<section id="experiments">' not in page
    assert f"No {paths.DATASET_PREVIEW}" in page
    assert ">123.5<" in page
    assert not (project / report.EPOCH_PNG).exists()  # a stale figure does not outlive its section


@pytest.mark.parametrize("missing,stage", [
    (paths.EVAL_DETAILS, "evaluate"),
    (paths.GENERATORS["G_B"], "train"),
    (paths.TRAIN_LOSSES, "train"),
    (paths.TRAIN_EVAL, "train"),
    (paths.PREPARED / "toy_horse2zebra" / "testA.npy", "prepare"),
])
def test_missing_input_is_one_line(project, capsys, missing, stage):
    cfg = config_from_dict(PARAMS)
    write_inputs(project, cfg)
    (project / missing).unlink()
    with pytest.raises(UserError) as err:
        report.build(cfg)
    message = str(err.value)
    assert "\n" not in message and str(missing) in message and f"dvc repro {stage}" in message

    # The CLI prints it as one line and exits 2; nothing was written.
    set_params(project, PARAMS)
    assert cli.main(["report"]) == 2
    assert capsys.readouterr().err.strip() == f"cyclegan report: error: {message}"
    assert not (project / report.REPORT).exists()
