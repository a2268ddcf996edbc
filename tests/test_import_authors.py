"""The authors' generators: `cyclegan import-authors` turns their files into ours, which translate
as their code does; train.init_from scores them through the DVC pipeline or trains from them.

The reference files are in ../shared/fixtures/authors_generators (README.md there): written by
the authors' code, with its output for one input.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cyclegan import checkpoint, generator_authors, paths
from cyclegan.cli import main as cli_main
from cyclegan.config import ConfigError, config_from_dict
from cyclegan.prepared_data import PreparedDataset, UnpairedTrainSet
from cyclegan.errors import UserError
from cyclegan.generator_file import load_generator
from cyclegan.networks import NLayerDiscriminator, ResnetGenerator, UnetGenerator
from helpers import TINY, TRAIN_PARAMS, VENV_BIN, ScriptedServer, make_project, merge, mlflow_client, pipeline_repo, read_losses, run, run_train

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "authors_generators"
CPU = torch.device("cpu")
# Our generator files' suffix, in every name these tests choose (torch.load reads a path by its suffix).
SUFFIX = generator_authors.SUFFIX
# tag: (netG, dropout), all ngf 8, instance norm
AUTHORS_FILES = {
    "resnet_9blocks_ngf8": ("resnet_9blocks", False),
    "resnet_9blocks_ngf8_dropout": ("resnet_9blocks", True),
    "resnet_6blocks_ngf8": ("resnet_6blocks", False),
    "resnet_6blocks_ngf8_dropout": ("resnet_6blocks", True),
    "resnet_9blocks_ngf8_legacy_running_stats": ("resnet_9blocks", False),
}


@pytest.fixture(scope="module", autouse=True)
def fixtures_present():
    assert FIXTURES.is_dir(), f"{FIXTURES}: missing; the shared fixtures are checked out beside the repository"


def authors_file(tag: str) -> Path:
    return FIXTURES / f"{tag}_net_G.pth"


def input_64() -> torch.Tensor:
    """input_64.png as the README decodes it: float32 / 127.5 - 1, channels first, a batch of 1."""
    with Image.open(FIXTURES / "input_64.png") as im:
        assert im.mode == "RGB"
        x = np.asarray(im, np.float32) / 127.5 - 1
    return torch.from_numpy(x).permute(2, 0, 1)[None]


@torch.no_grad()
def translate(generator_file: Path, x: torch.Tensor) -> np.ndarray:
    return load_generator(generator_file, CPU)(x)[0].numpy()


def weights(generator_file: Path) -> dict[str, torch.Tensor]:
    """The weights of one of our generator files, read as translate reads it."""
    return load_generator(generator_file, CPU).state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def pipeline_generator(root: Path, name: str) -> Path:
    """models/G_A.<suffix> as train writes it, whatever the suffix of the generator format."""
    found = sorted((root / paths.MODELS).glob(f"{name}.*"))
    assert len(found) == 1, found
    return found[0]


def error_of(source: str | Path, tmp_path: Path) -> str:
    with pytest.raises(UserError) as e:
        generator_authors.import_generator(str(source), "A2B", tmp_path / f"out{SUFFIX}")
    message = str(e.value)
    assert "\n" not in message
    assert not (tmp_path / f"out{SUFFIX}").exists()
    return message


# --- their files, our translation --------------------------------------------------------------

@pytest.mark.parametrize("tag", list(AUTHORS_FILES))
def test_each_authors_file_imports_and_translates_as_their_code(tag, tmp_path):
    out = tmp_path / f"{tag}{SUFFIX}"
    imported = generator_authors.import_generator(str(authors_file(tag)), "A2B", out)
    netG, dropout = AUTHORS_FILES[tag]
    model = imported.converted.model
    assert (model.netG, model.ngf, model.norm, model.use_dropout) == (netG, 8, "instance", dropout)
    if "legacy" in tag:
        assert any("dropped 69 InstanceNorm running statistics" in note for note in imported.converted.adapted)
    expected = np.load(FIXTURES / f"{tag}_output.npy")
    np.testing.assert_allclose(translate(out, input_64()), expected, rtol=0, atol=1e-5)


def test_a_dataparallel_file_imports_through_the_cli_without_a_project(tmp_path, monkeypatch, capsys):
    state = torch.load(authors_file("resnet_9blocks_ngf8_dropout"), weights_only=True)
    wrapped = tmp_path / "latest_net_G_A.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, wrapped)
    monkeypatch.chdir(tmp_path)  # no params.yaml here: import-authors needs none
    assert cli_main(["import-authors", str(wrapped), "--direction", "B2A"]) == 0
    out = tmp_path / paths.INIT / f"latest_net_G_A{SUFFIX}"  # the default output
    printed = capsys.readouterr().out
    assert "removed the DataParallel prefix" in printed
    assert f"train.init_from.G_B: {paths.INIT / f'latest_net_G_A{SUFFIX}'}" in printed
    assert "model.use_dropout: true" in printed
    expected = np.load(FIXTURES / "resnet_9blocks_ngf8_dropout_output.npy")
    np.testing.assert_allclose(translate(out, input_64()), expected, rtol=0, atol=1e-5)


def test_cyclegan_translate_with_an_imported_file_gives_their_output(tmp_path, monkeypatch):
    out = tmp_path / f"h2z{SUFFIX}"
    generator_authors.import_generator(str(authors_file("resnet_6blocks_ngf8")), "A2B", out)
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(FIXTURES / "input_64.png", photos / "horse.png")
    (tmp_path / "params.yaml").write_text(json.dumps({"data": {"load_size": 64, "crop_size": 64},
                                                      "eval": {"device": "cpu"}}))
    monkeypatch.chdir(tmp_path)
    assert cli_main(["translate", "--input", str(photos), "--generator", str(out), "--output", "fakes"]) == 0
    ours = np.asarray(Image.open(tmp_path / "fakes" / "horse.png"), np.int16)
    theirs = np.load(FIXTURES / "resnet_6blocks_ngf8_output.npy").transpose(1, 2, 0)
    theirs = np.round((np.clip(theirs, -1, 1) + 1) * 127.5).astype(np.int16)
    # 1e-5 apart before rounding: a value at a rounding boundary may land on the next level.
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01


def test_a_u_net_and_a_norm_none_network_import_with_what_their_code_saves(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 128, 128) * 2 - 1  # unet_128 halves 7 times
    # A pix2pix-style U-Net: batch norm with statistics, saved as a bare state dict.
    unet = UnetGenerator(num_downs=7, ngf=8, norm="batch").eval()
    for m in unet.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(unet.state_dict(), tmp_path / "unet_net_G.pth")
    imported = generator_authors.import_generator(str(tmp_path / "unet_net_G.pth"), "A2B", tmp_path / f"unet{SUFFIX}")
    assert (imported.converted.model.netG, imported.converted.model.norm) == ("unet_128", "batch")
    with torch.no_grad():
        np.testing.assert_allclose(translate(tmp_path / f"unet{SUFFIX}", x), unet(x)[0].numpy(), atol=1e-6)

    # Their norm `none` convolutions have no bias (the last one has); ours do, which zeros match.
    net = ResnetGenerator(ngf=8, n_blocks=6, norm="none").eval()
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.normal_(m.weight, 0, 0.1)
            torch.nn.init.zeros_(m.bias)
    last = "model.23.bias"
    torch.nn.init.normal_(net.state_dict()[last], 0, 0.1)
    theirs = {k.replace(".block.", ".conv_block."): v for k, v in net.state_dict().items()
              if not k.endswith(".bias") or k == last}
    torch.save(theirs, tmp_path / "none_net_G.pth")
    imported = generator_authors.import_generator(str(tmp_path / "none_net_G.pth"), "A2B", tmp_path / f"none{SUFFIX}")
    assert imported.converted.model.norm == "none"
    assert any("added 17 zero biases" in note for note in imported.converted.adapted)
    with torch.no_grad():
        np.testing.assert_allclose(translate(tmp_path / f"none{SUFFIX}", x), net(x)[0].numpy(), atol=1e-6)


# --- what is refused, in one line ------------------------------------------------------------------

def test_a_truncated_file_is_one_line(tmp_path):
    data = authors_file("resnet_6blocks_ngf8").read_bytes()
    cut = tmp_path / "latest_net_G.pth"
    cut.write_bytes(data[: len(data) // 2])
    assert error_of(cut, tmp_path) == (f"{cut}: not a complete PyTorch file: its zip archive is cut short or "
                                       f"damaged; download or copy it again")


def test_a_discriminator_is_one_line(tmp_path):
    path = tmp_path / "latest_net_D_A.pth"
    torch.save(NLayerDiscriminator(ndf=8).state_dict(), path)
    assert error_of(path, tmp_path) == (f"{path}: a discriminator (PatchGAN layers model.0, model.2, ...), "
                                        f"not a "
                                        f"generator; import the *_net_G*.pth file of the same run")


def test_a_pix2pix_u_net_with_wrong_shapes_is_one_line(tmp_path):
    state = UnetGenerator(num_downs=8, ngf=8, norm="batch").state_dict()
    key = "model.model.1.model.3.model.1.weight"  # the third level's down convolution: 16 -> 32 channels
    state[key] = torch.zeros(32, 24, 4, 4)
    path = tmp_path / "latest_net_G.pth"
    torch.save(state, path)
    assert error_of(path, tmp_path) == (f"{path}: {key} has shape [32, 24, 4, 4] where a unet_256 generator "
                                        f"with "
                                        f"ngf 8, norm batch has [32, 16, 4, 4]; not a generator cyclegan can "
                                        f"build")

    gray = UnetGenerator(num_downs=8, ngf=8, norm="batch").state_dict()
    gray["model.model.0.weight"] = torch.zeros(8, 1, 4, 4)
    torch.save(gray, path)
    assert "model.model.0.weight takes 1-channel inputs; cyclegan translates RGB images" in error_of(path, tmp_path)


class RunsCode:
    """Unpickling this calls os.system: what a malicious .pth can do under torch.load(weights_only=False)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "latest_net_G.pth"
    torch.save({"model.1.weight": RunsCode(marker)}, path)
    message = error_of(path, tmp_path)
    assert message.startswith(f"{path}: refused: loading it would call ") and "system" in message
    assert not marker.exists()


def test_a_path_or_name_that_is_neither_is_one_line(tmp_path):
    message = error_of("horse2zebr", tmp_path)
    assert message.startswith("'horse2zebr' is neither a file nor one of the authors' pretrained generators: ")
    assert all(name in message for name in generator_authors.OFFICIAL) and len(generator_authors.OFFICIAL) == 18
    assert error_of(tmp_path / "missing.pth", tmp_path) == f"{tmp_path / 'missing.pth'}: no such file"


# --- the published names, through a mirror ----------------------------------------------------------

def test_an_official_name_downloads_from_the_mirror_resuming_a_dropped_connection(tmp_path, monkeypatch, capsys):
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(authors_file("resnet_6blocks_ngf8"), served / "horse2zebra.pth")
    mirror = ScriptedServer()
    mirror.files["horse2zebra.pth"] = (served / "horse2zebra.pth").read_bytes()
    mirror.script = ["drop"]  # the first answer sends half the file and closes
    try:
        monkeypatch.setenv(generator_authors.URL_ENV, mirror.url)
        monkeypatch.setenv("CYCLEGAN_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("CYCLEGAN_DOWNLOAD_BACKOFF", "0.01")
        project = tmp_path / "project"
        project.mkdir()
        monkeypatch.chdir(project)
        assert cli_main(["import-authors", "horse2zebra"]) == 0
        size = (served / "horse2zebra.pth").stat().st_size
        assert [(r["path"], r["range"]) for r in mirror.requests] == [("/horse2zebra.pth", None),
                                                                     ("/horse2zebra.pth", f"bytes={size // 2}-")]
        assert f"from {mirror.url}/horse2zebra.pth" in capsys.readouterr().out
        out = project / paths.INIT / f"horse2zebra{SUFFIX}"
        expected = np.load(FIXTURES / "resnet_6blocks_ngf8_output.npy")
        np.testing.assert_allclose(translate(out, input_64()), expected, rtol=0, atol=1e-5)
        assert not any((tmp_path / "cache").rglob("*.part"))  # nothing left to resume

        # A name the mirror lacks: one line naming the URL, the variable, and the file to provide.
        message = error_of("zebra2horse", tmp_path)
        assert message == (f"{mirror.url}/zebra2horse.pth: not found (HTTP 404); check the name (one of 18 "
                           f"official ones), or set {generator_authors.URL_ENV} to a server or folder that "
                           f"holds "
                           f"zebra2horse.pth")
    finally:
        mirror.close()

    # The mirror may be a folder too, given as a path or a file:// URL.
    for base in (str(served), served.as_uri()):
        monkeypatch.setenv(generator_authors.URL_ENV, base)
        out = tmp_path / f"from_folder{SUFFIX}"
        generator_authors.import_generator("horse2zebra", "A2B", out)
        np.testing.assert_allclose(translate(out, input_64()), expected, rtol=0, atol=1e-5)
    assert error_of("zebra2horse", tmp_path).startswith(f"{generator_authors.URL_ENV}={served.as_uri()}: no "
                                                        f"zebra2horse.pth")


# --- train.init_from -----------------------------------------------------------------------------

def import_into(project: Path, tag: str, name: str, direction: str = "A2B") -> str:
    """Import a fixture into the project's models/init/ as `name`; returns its train.init_from value."""
    rel = paths.INIT / f"{name}{SUFFIX}"
    generator_authors.import_generator(str(authors_file(tag)), direction, project / rel)
    return str(rel)


def test_init_from_is_checked_before_anything_runs(project):
    with pytest.raises(ConfigError, match=rf"^params.yaml: 'train.init_from.G_A' is 'elsewhere/h2z{SUFFIX}': "
                                          r"generator files to start from must be in models/init/"):
        config_from_dict({"train": {"init_from": {"G_A": f"elsewhere/h2z{SUFFIX}"}}})
    with pytest.raises(ConfigError, match="must be in models/init/"):
        config_from_dict({"train": {"init_from": {"G_B": "models/init/../G_B.pt"}}})
    with pytest.raises(ConfigError, match=r"'train.n_epochs' plus train.n_epochs_decay must be >= 1 \(0 only "
                                          r"with "
                                          r"train.init_from"):
        config_from_dict({"train": {"n_epochs": 0, "n_epochs_decay": 0}})
    assert config_from_dict({"train": {"n_epochs": 0, "n_epochs_decay": 0,
                                       "init_from": {"G_B": f"./models/init/z2h{SUFFIX}"}}})

    # The architecture in the file must be the model params'; the line says which keys to set.
    init = import_into(project, "resnet_9blocks_ngf8_dropout", "h2z")
    make_project(project, model={"netG": "resnet_6blocks", "ngf": 16}, train={"init_from": {"G_A": init}})
    with pytest.raises(UserError) as e:
        run_train()
    assert str(e.value) == (f"train.init_from.G_A: {init} holds a generator of netG resnet_9blocks, ngf 8, "
                            f"norm "
                            f"instance, use_dropout true; set model.netG: resnet_9blocks, model.ngf: 8, "
                            f"model.use_dropout: true in params.yaml to start from it")
    # An A->B generator (import-authors' default direction) cannot start G_B, the B->A one.
    make_project(project, model={"netG": "resnet_9blocks", "ngf": 8, "use_dropout": True},
                 train={"init_from": {"G_B": init}})
    with pytest.raises(UserError, match=rf"^train.init_from.G_B: {re.escape(str(init))} is a A2B generator "
                                        rf"and G_B "
                                        r"translates B2A; .*--direction B2A`$"):
        run_train()
    make_project(project, train={"init_from": {"G_B": f"models/init/missing{SUFFIX}"}})
    with pytest.raises(UserError, match=r"^train.init_from.G_B: models/init/missing\S* not found; write it "
                                        r"with `cyclegan import-authors"):
        run_train()


def test_the_fingerprint_holds_the_init_content_not_its_path():
    cfg = config_from_dict(TRAIN_PARAMS)
    renamed = config_from_dict(merge(TRAIN_PARAMS, {"train": {"init_from": {"G_A": f"models/init/other{SUFFIX}"}}}))
    scratch = checkpoint.fingerprint(cfg, "data", "code")
    assert checkpoint.fingerprint(cfg, "data", "code", {}) == scratch
    one = checkpoint.fingerprint(cfg, "data", "code", {"G_A": "aa"})
    assert one != scratch
    assert checkpoint.fingerprint(renamed, "data", "code", {"G_A": "aa"}) == one
    assert checkpoint.fingerprint(cfg, "data", "code", {"G_A": "bb"}) != one
    assert checkpoint.fingerprint(cfg, "data", "code", {"G_B": "aa"}) != one


def test_zero_epochs_write_the_init_generators_unchanged(project):
    h2z = import_into(project, "resnet_6blocks_ngf8", "h2z")
    z2h = import_into(project, "resnet_6blocks_ngf8", "z2h", direction="B2A")
    make_project(project, train={"n_epochs": 0, "n_epochs_decay": 0, "init_from": {"G_A": h2z, "G_B": z2h}})
    run_train()
    for name, init in (("G_A", h2z), ("G_B", z2h)):
        assert_same_weights(weights(pipeline_generator(project, name)), weights(project / init))
    assert read_losses() == []
    client = mlflow_client()
    (only_run,) = client.search_runs([client.get_experiment_by_name("cyclegan").experiment_id])
    tags = only_run.data.tags
    assert tags["init_G_A_sha256"] == hashlib.sha256((project / h2z).read_bytes()).hexdigest()
    assert tags["init_G_B_sha256"] == hashlib.sha256((project / z2h).read_bytes()).hexdigest()


def first_step_terms(project: Path, G_A: torch.nn.Module, G_B: torch.nn.Module, params: dict) -> dict[str, float]:
    """The cycle and identity losses of training step 1 (the first sample of epoch 0) for these nets."""
    data = PreparedDataset.open(project / paths.PREPARED / params["data"]["dataset"])
    train_set = UnpairedTrainSet(data.array("trainA"), data.array("trainB"), params["data"]["crop_size"],
                                 True, params["seed"])
    a, b = (t[None].float() / 127.5 - 1 for t in train_set[0])
    l1, cfg = torch.nn.functional.l1_loss, config_from_dict(params)
    with torch.no_grad():
        return {"loss_cycle_A": float(l1(G_B(G_A(a)), a)) * cfg.lambda_cycle,
                "loss_idt_A": float(l1(G_A(b), b)) * cfg.identity_weight}


def test_fine_tuning_starts_from_the_imported_weights(tmp_path, monkeypatch):
    results = {}
    for run_name in ("imported", "scratch"):
        root = tmp_path / run_name
        root.mkdir()
        monkeypatch.chdir(root)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        init = {}
        if run_name == "imported":
            init = {"G_A": import_into(root, "resnet_6blocks_ngf8", "h2z"),
                    "G_B": import_into(root, "resnet_6blocks_ngf8", "z2h", "B2A")}
        params = make_project(root, train={"max_steps": 3, "init_from": init})
        run_train()
        results[run_name] = (read_losses()[0], params)

    # Step 1's generator losses are computed before its update: with the imported weights.
    first, params = results["imported"]
    assert first["step"] == "1"
    net = load_generator(tmp_path / "imported" / paths.INIT / f"h2z{SUFFIX}", CPU)
    expected = first_step_terms(tmp_path / "imported", net, net, params)
    for key, value in expected.items():
        assert math.isclose(float(first[key]), value, rel_tol=1e-5), (key, first[key], value)
        assert not math.isclose(float(results["scratch"][0][key]), value, rel_tol=1e-2), key
    # Training moved them on from there.
    trained = weights(pipeline_generator(tmp_path / "imported", "G_A"))
    assert not all(torch.equal(trained[k], v) for k, v in net.state_dict().items())


# --- the pipeline: score the imported generators with dvc repro ----------------------------------------

# The tiny pipeline of tests/test_pipeline.py, with the fixtures' architecture and no training.
SCORE_PARAMS = merge(TINY, {
    "data": {"toy": {"image_size": 32, "n_train_a": 8, "n_train_b": 8, "n_test": 4}},
    "model": {"netG": "resnet_6blocks", "ngf": 8},
    "train": {"n_epochs": 0, "n_epochs_decay": 0,
              "init_from": {"G_A": f"models/init/h2z{SUFFIX}", "G_B": f"models/init/z2h{SUFFIX}"}},
    "eval": {"batch_size": 4, "n_samples": 2},
})


@pytest.mark.slow
def test_dvc_repro_scores_imported_generators_and_reruns_train_when_one_changes(tmp_path):
    project, env = pipeline_repo(tmp_path / "project", SCORE_PARAMS)
    dvc = [str(VENV_BIN / "dvc"), "repro"]
    cyclegan = [sys.executable, "-m", "cyclegan", "import-authors"]
    # Another generator of the same architecture: the fixture's weights scaled, saved as theirs.
    other = tmp_path / "other_net_G.pth"
    torch.save({k: v * 0.9 for k, v in torch.load(authors_file("resnet_6blocks_ngf8"), weights_only=True).items()},
               other)
    run([*cyclegan, str(authors_file("resnet_6blocks_ngf8")), "--output", f"models/init/h2z{SUFFIX}"], project, env)
    run([*cyclegan, str(other), "--direction", "B2A", "--output", f"models/init/z2h{SUFFIX}"], project, env)

    first = run(dvc, project, env)
    assert "Running stage 'train'" in first.stdout
    assert_same_weights(weights(pipeline_generator(project, "G_A")), weights(project / f"models/init/h2z{SUFFIX}"))
    assert_same_weights(weights(pipeline_generator(project, "G_B")), weights(project / f"models/init/z2h{SUFFIX}"))
    scores = json.loads((project / paths.EVAL_METRICS).read_text())
    for key in ("fid_A2B", "kid_A2B", "fid_B2A", "kid_B2A"):
        assert math.isfinite(scores[key]), key
    assert (project / paths.TRAIN_LOSSES).read_text().count("\n") == 1  # the header: no step
    assert len(list((project / "data/translated/A2B").glob("*.png"))) == 4
    assert (project / "reports/index.html").is_file()

    # Same params, other weights in the same file: DVC sees the content and trains (writes) again.
    run([*cyclegan, str(other), "--output", f"models/init/h2z{SUFFIX}"], project, env)
    second = run(dvc, project, env)
    assert "Running stage 'train'" in second.stdout and "Running stage 'evaluate'" in second.stdout
    assert_same_weights(weights(pipeline_generator(project, "G_A")), weights(project / f"models/init/z2h{SUFFIX}"))
    assert json.loads((project / paths.EVAL_METRICS).read_text())["fid_A2B"] != scores["fid_A2B"]

    third = run(dvc, project, env)
    assert "Running stage 'train'" not in third.stdout and "Running stage 'evaluate'" not in third.stdout
