"""`cyclegan translate`: test sets both ways, full resolution, a user's folder, bad generator files."""
from __future__ import annotations

import io
import json
import os
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cyclegan import paths
from cyclegan.cli import main as cli_main
from cyclegan.config import config_from_dict
from cyclegan.errors import UserError
from cyclegan.generator_file import load_generator, open_generator, read_generator, save_generator, translate_array
from cyclegan.networks import build_generator
from cyclegan.stages import translate
from helpers import write_prepared

SMALL = {"model": {"netG": "resnet_6blocks", "ngf": 4}, "data": {"load_size": 32, "crop_size": 32},
         "eval": {"batch_size": 3}}


@pytest.fixture
def generators_and_test_sets(project):
    """A function of param overrides that fills the project: generators of SMALL + overrides in
    models/, prepared test sets of random images and raw test images of odd sizes. It returns the
    config and the prepared folder."""
    def make(**overrides) -> tuple:
        cfg = config_from_dict({**SMALL, **overrides})
        torch.manual_seed(0)
        for name, direction in (("G_A", "A2B"), ("G_B", "B2A")):
            save_generator(build_generator(cfg.model), cfg.model, direction, paths.GENERATORS[name])
        rng = np.random.default_rng(0)
        arrays, files = {}, {}
        for split, n in (("testA", 5), ("testB", 4)):
            arrays[split] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            files[split] = [f"{split}_{i}.jpg" for i in range(n)]
            raw_dir = paths.RAW / "toy_horse2zebra" / split
            raw_dir.mkdir(parents=True)
            for i, name in enumerate(files[split]):  # raw images of odd sizes, for full resolution
                Image.fromarray(rng.integers(0, 256, (30 + i, 45, 3), dtype=np.uint8)).save(raw_dir / name)
        return cfg, write_prepared(project, arrays, files)
    return make


def test_test_sets_both_ways_match_the_generators(generators_and_test_sets):
    cfg, prepared = generators_and_test_sets()
    translate.main(cfg, None)
    a2b = sorted((paths.TRANSLATED / "A2B").iterdir())
    assert [p.name for p in a2b] == [f"testA_{i}.png" for i in range(5)]
    assert len(list((paths.TRANSLATED / "B2A").iterdir())) == 4
    # The PNG holds exactly what the generator computes, batch or no batch.
    net = load_generator(paths.GENERATORS["G_A"], torch.device("cpu"))
    expected = translate_array(net, np.load(prepared / "testA.npy")[2:3], 1, torch.device("cpu"))[0]
    np.testing.assert_array_equal(np.asarray(Image.open(a2b[2])), expected)


@pytest.mark.parametrize("overrides", [{}, {"eval": {"full_resolution": True}}])
def test_translation_runs_in_true_fp32(generators_and_test_sets, monkeypatch, overrides):
    """No TF32 on GPUs: the stage computes inside device.exact_fp32 (on a CPU the flags alone show it)."""
    cfg, _ = generators_and_test_sets(**overrides)
    seen = []

    def recording(*args, **kwargs):
        seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
        return translate_array(*args, **kwargs)

    monkeypatch.setattr(translate, "translate_array", recording)
    translate.main(cfg, None)
    assert seen and set(seen) == {("ieee", "ieee")}


def test_full_resolution_keeps_each_size_rounded_to_multiples_of_4(generators_and_test_sets):
    cfg, _ = generators_and_test_sets(eval={"full_resolution": True})
    translate.main(cfg, None)
    sizes = [Image.open(p).size for p in sorted((paths.TRANSLATED / "A2B").iterdir())]
    # The raw images are 45 wide and 30..34 high: each side goes to its nearest multiple of 4.
    assert sizes == [(44, 32)] * 5


def test_a_unet_256_translates_a_300x200_image_at_full_resolution(generators_and_test_sets, tmp_path):
    """The sides are rounded to what the generator file's architecture needs (256 for unet_256, whose
    skip connections match only then), not to the ResNet's 4 nor to the params' netG."""
    cfg, _ = generators_and_test_sets(eval={"full_resolution": True})  # params: resnet_6blocks
    unet = config_from_dict({**SMALL, "model": {"netG": "unet_256", "ngf": 4},
                             "data": {"load_size": 256, "crop_size": 256}}).model
    torch.manual_seed(0)
    save_generator(build_generator(unet), unet, "A2B", tmp_path / "unet.safetensors")
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(photo).save(photos / "wide.png")
    args = Namespace(input=photos, generator=tmp_path / "unet.safetensors", output=tmp_path / "out")
    translate.main(cfg, args)
    out = np.asarray(Image.open(tmp_path / "out" / "wide.png"))
    assert out.shape == (256, 256, 3)  # 300 and 200 both round to 256
    net = load_generator(tmp_path / "unet.safetensors", torch.device("cpu"))
    resized = np.asarray(Image.fromarray(photo).resize((256, 256), Image.BICUBIC))[None]
    np.testing.assert_array_equal(out, translate_array(net, resized, 1, torch.device("cpu"))[0])


def test_a_users_folder_with_a_chosen_generator(generators_and_test_sets, tmp_path):
    cfg, _ = generators_and_test_sets(data={**SMALL["data"], "alpha_background": [0, 128, 255]})  # not the default white
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (50, 40), (200, 100, 0)).save(photos / "a.jpg")
    Image.new("LA", (32, 32), (90, 0)).save(photos / "b.png")  # fully transparent grey
    (photos / "notes.txt").write_text("not an image")
    args = Namespace(input=photos, generator=paths.GENERATORS["G_B"], output=tmp_path / "out")
    translate.main(cfg, args)
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == ["a.png", "b.png", translate.REPORT]
    assert Image.open(tmp_path / "out" / "a.png").size == (32, 32)  # resized to crop_size
    # Transparent pixels are composited over data.alpha_background, as `prepare` does for training.
    net = load_generator(paths.GENERATORS["G_B"], torch.device("cpu"))
    # A contiguous array, as a decoded image is: a one-colour image is ill-conditioned under instance
    # norm (rounding noise is all the variance there is), so a stride-0 view, which convolutions
    # read along another code path, translates to other colours on some CPUs (AVX2).
    background = np.full((1, 32, 32, 3), [0, 128, 255], np.uint8)
    expected = translate_array(net, background, 1, torch.device("cpu"))[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "b.png")), expected)


def test_bad_inputs_give_one_line(generators_and_test_sets, tmp_path, capsys):
    cfg, _ = generators_and_test_sets()
    (paths.GENERATORS["G_A"]).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="G_A.safetensors: not a cyclegan generator file"):
        translate.main(cfg, None)
    assert not paths.TRANSLATED.exists()  # nothing half-written

    Path("params.yaml").write_text("data:\n  crop_size: 32\n  load_size: 32\n")
    code = cli_main(["translate", "--input", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "missing: not a folder" in err


def test_missing_prepared_data_is_a_one_line_error(project):
    # No data/prepared here: one line naming the file, not a traceback.
    with pytest.raises(UserError, match=r"data/prepared/toy_horse2zebra/manifest.json: no prepared dataset"):
        translate.main(config_from_dict(SMALL), None)


# --- the generator file -----------------------------------------------------------------------------

def test_generator_file_is_safetensors_with_its_architecture_and_the_same_bytes_each_time(project):
    import json
    import subprocess
    import sys

    import safetensors

    cfg = config_from_dict({**SMALL, "model": {"netG": "resnet_6blocks", "ngf": 4, "use_dropout": True}})
    torch.manual_seed(0)
    net = build_generator(cfg.model)
    save_generator(net, cfg.model, "B2A", Path("g.safetensors"))
    with safetensors.safe_open("g.safetensors", framework="pt") as f:
        header = json.loads(f.metadata()["cyclegan"])
        assert set(f.keys()) == set(net.state_dict())
    assert header["direction"] == "B2A" and header["model"]["use_dropout"] is True and header["model"]["ngf"] == 4
    model, direction, state = read_generator(Path("g.safetensors"))
    assert model == cfg.model and direction == "B2A" and state.keys() == net.state_dict().keys()
    # The header alone, as the MLflow model logging reads it: no weights come back.
    assert read_generator(Path("g.safetensors"), weights=False) == (cfg.model, "B2A", {})
    model, direction, loaded = open_generator(Path("g.safetensors"), torch.device("cpu"))
    assert model == cfg.model and direction == "B2A" and not loaded.training
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x), net.eval()(x), rtol=0, atol=0)

    # Another process (another hash seed, another dict order) writes the same bytes.
    code = ("import sys, torch; from pathlib import Path; from cyclegan.config import config_from_dict; "
            "from cyclegan.networks import build_generator; from cyclegan.generator_file import "
            "save_generator; "
            "cfg = config_from_dict({'model': {'netG': 'resnet_6blocks', 'ngf': 4, 'use_dropout': True}}); "
            "torch.manual_seed(0); save_generator(build_generator(cfg.model), cfg.model, 'B2A', "
            "Path(sys.argv[1]))")
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", code, f"again{seed}.safetensors"], check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": seed})
        assert Path(f"again{seed}.safetensors").read_bytes() == Path("g.safetensors").read_bytes()


def test_old_pt_generators_are_still_read_with_a_note(project, capsys):
    from dataclasses import asdict

    cfg = config_from_dict(SMALL)
    torch.manual_seed(0)
    net = build_generator(cfg.model).eval()
    torch.save({"model": asdict(cfg.model), "direction": "A2B", "state_dict": net.state_dict()}, "G_A.pt")
    loaded = load_generator(Path("G_A.pt"), torch.device("cpu"))
    assert "G_A.pt is a .pt generator of cyclegan <= 0.1, still read" in capsys.readouterr().err
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_generator_files_that_do_not_fit_get_one_line(project):
    import json

    import safetensors.torch

    cfg = config_from_dict(SMALL)
    state = build_generator(cfg.model).state_dict()
    header = {"format": "cyclegan-generator", "version": 1, "model": cfg.to_dict()["model"], "direction": "A2B"}
    cases = {
        "newer.safetensors": ({**header, "version": 99}, state, "version 99 is newer than this cyclegan reads"),
        "other.safetensors": ({**header, "format": "something-else"}, state, "not a cyclegan generator file"),
        "wrong.safetensors": ({**header, "model": {**header["model"], "ngf": 8}}, state,
                              "weights do not fit the architecture in the file"),
    }
    for name, (head, tensors, message) in cases.items():
        Path(name).write_bytes(safetensors.torch.save(tensors, metadata={"cyclegan": json.dumps(head)}))
        with pytest.raises(UserError, match=message) as err:
            load_generator(Path(name), torch.device("cpu"))
        assert name in str(err.value) and "\n" not in str(err.value)
    Path("bare.safetensors").write_bytes(safetensors.torch.save(state))  # no metadata
    with pytest.raises(UserError, match="bare.safetensors: not a cyclegan generator file"):
        load_generator(Path("bare.safetensors"), torch.device("cpu"))


# --- a user's folder: the decode policy of prepare, names kept, nothing of the user's lost -----------

def exif_rotated_jpeg(path: Path) -> None:
    """40 wide and 20 high as stored, tagged 'rotate 90 CW': upright it is 20 wide and 40 high."""
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, "JPEG", exif=exif, quality=95)


def users_photos(folder: Path) -> Path:
    folder.mkdir()
    exif_rotated_jpeg(folder / "été à la mer 1.jpg")
    Image.new("CMYK", (36, 28), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((24, 24), 40000, np.uint16)).save(folder / "sixteen bit.png")
    Image.new("RGB", (24, 24), (1, 2, 3)).save(folder / "same.jpg")
    Image.new("RGB", (24, 24), (4, 5, 6)).save(folder / "same.png")  # its translation would be same.jpg's
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")  # not an image's name: ignored, not listed
    os.symlink(folder / "gone.png", folder / "dangling.png")
    os.mkfifo(folder / "pipe.jpg")
    return folder


def generator_file(name: str = "G_A") -> Path:
    """The fixture's generator file, whatever its format's suffix."""
    return next(paths.MODELS.glob(f"{name}.*"))


def test_a_users_folder_keeps_names_and_lists_what_it_skips(generators_and_test_sets, tmp_path, capsys):
    cfg, _ = generators_and_test_sets(eval={"full_resolution": True})  # each image at its own size
    photos = users_photos(tmp_path / "photos")
    gen = generator_file()
    translate.main(cfg, Namespace(input=photos, generator=gen, output=None))
    out = tmp_path / "photos_translated"  # the default
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["été à la mer 1.png", "cmyk.png", "sixteen bit.png", "same.png", translate.REPORT])
    assert Image.open(out / "été à la mer 1.png").size == (20, 40)  # turned upright (EXIF) first
    assert Image.open(out / "cmyk.png").size == (36, 28)
    report = json.loads((out / translate.REPORT).read_text())
    skipped = {x["file"]: x["reason"] for x in report["skipped"]}
    assert sorted(skipped) == ["dangling.png", "empty.png", "pipe.jpg", "same.png", "truncated.jpg"]
    assert skipped["same.png"].startswith("its translation would be same.png, as that of same.jpg")
    assert skipped["dangling.png"].startswith("dangling symbolic link")
    assert skipped["pipe.jpg"] == "a FIFO (named pipe), not a file"
    assert skipped["empty.png"] == "empty file"
    assert skipped["truncated.jpg"].startswith("truncated or corrupt")
    assert report["translated"]["été à la mer 1.jpg"] == "été à la mer 1.png"
    # same.png holds same.jpg's translation: nothing was overwritten.
    cpu = torch.device("cpu")
    expected = translate_array(load_generator(gen, cpu), np.asarray(Image.open(photos / "same.jpg").convert("RGB"))[None],
                               1, cpu)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "same.png")), expected)
    captured = capsys.readouterr()
    assert sum(line.startswith("cyclegan translate: skipped ") for line in captured.err.splitlines()) == 5
    assert f"4 images -> {out} (5 skipped, listed in {out / translate.REPORT})" in captured.out


def test_fail_stops_at_the_first_bad_file_and_keeps_the_last_output(generators_and_test_sets, tmp_path):
    cfg, _ = generators_and_test_sets()
    photos = users_photos(tmp_path / "photos")
    gen, out = generator_file(), tmp_path / "out"
    translate.main(cfg, Namespace(input=photos, generator=gen, output=out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    strict = config_from_dict({**SMALL, "data": {**SMALL["data"], "on_bad_image": "fail"}})
    # Entries without content and colliding names stop it before any image is decoded ...
    with pytest.raises(UserError, match=r"photos/dangling\.png: dangling symbolic link .*; fix or remove it, "
                                        r"or set data\.on_bad_image: skip in params\.yaml"):
        translate.main(strict, Namespace(input=photos, generator=gen, output=out))
    for name in ("dangling.png", "pipe.jpg", "same.png"):
        (photos / name).unlink()
    # ... a file that does not decode, when it is reached.
    with pytest.raises(UserError, match=r"photos/empty\.png: empty file; fix or remove it"):
        translate.main(strict, Namespace(input=photos, generator=gen, output=out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_folders_with_nothing_to_translate_are_one_line(generators_and_test_sets, tmp_path, capsys):
    generators_and_test_sets()
    Path("params.yaml").write_text("data:\n  crop_size: 32\n  load_size: 32\nmodel:\n  ngf: 4\n")
    gen = str(generator_file())
    empty, texts, broken = (tmp_path / n for n in ("empty", "texts", "broken"))
    for folder in (empty, texts, broken):
        folder.mkdir()
    (texts / "notes.txt").write_text("not an image")
    (broken / "empty.png").write_bytes(b"")
    (broken / "random.jpg").write_bytes(np.random.default_rng(1).bytes(3000))
    for folder, says in ((empty, "the folder is empty; put the images to translate there"),
                         (texts, "no images among its 1 entries (looked for .jpg"),
                         (broken, "no usable images (2 skipped, first empty.png: empty file)")):
        out = tmp_path / f"{folder.name}_out"
        code = cli_main(["translate", "--input", str(folder), "--generator", gen, "--output", str(out)])
        err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("cyclegan "
                                                                                            "translate: "
                                                                                            "skipped")]
        assert code == 2 and len(err) == 1 and says in err[0], err
        assert not out.exists()


def test_an_output_folder_is_replaced_only_if_this_command_wrote_it(generators_and_test_sets, tmp_path):
    cfg, _ = generators_and_test_sets()
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (24, 24)).save(photos / "a.png")
    gen = generator_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("the user's")
    with pytest.raises(UserError, match=r"--output .*mine: holds files that `cyclegan translate` did not "
                                        r"write"):
        translate.main(cfg, Namespace(input=photos, generator=gen, output=mine))
    assert (mine / "keep.txt").read_text() == "the user's"
    for output in (photos, tmp_path):
        with pytest.raises(UserError, match="holds the input folder"):
            translate.main(cfg, Namespace(input=photos, generator=gen, output=output))
    assert (photos / "a.png").is_file()
    translate.main(cfg, Namespace(input=photos, generator=gen, output=tmp_path / "out"))
    translate.main(cfg, Namespace(input=photos, generator=gen, output=tmp_path / "out"))  # its own: replaced
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", translate.REPORT]


def test_test_images_whose_translations_would_share_a_name_are_refused(project):
    images = np.zeros((2, 32, 32, 3), np.uint8)
    write_prepared(project, {"testA": images, "testB": images},
                   {"testA": ["a.jpg", "a.png"], "testB": ["b.jpg", "c.jpg"]})
    with pytest.raises(UserError, match=r"testA/a\.jpg and .*testA/a\.png: both would be translated to "
                                        r"a\.png; "
                                        r"rename one of them"):
        translate.main(config_from_dict(SMALL), None)
    assert not paths.TRANSLATED.exists()
