"""`cyclegan prepare`: bad images skipped or fatal, colour modes converted right, the format of
cyclegan.prepared_data written atomically, duplicates and targets handled."""
from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cyclegan import images
from cyclegan.datasets import toy
from cyclegan.config import config_from_dict
from cyclegan.prepared_data import PreparedDataset
from cyclegan.errors import UserError
from cyclegan.stages import prepare

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "horse2zebra"
# Seven official horse2zebra images are grayscale JPEGs; two of them, and a colour one.
GRAY = ["n02391049_226.jpg", "n02391049_2341.jpg"]
COLOUR = "n02391049_10007.jpg"
BACKGROUND = (0, 0, 255)
LOAD, CROP = 24, 16


def cfg(dataset: str = "./mydata", **data):
    return config_from_dict({"data": {"dataset": dataset, "load_size": LOAD, "crop_size": CROP,
                                      "alpha_background": list(BACKGROUND), **data}})


def noise(size=(40, 40), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge canvas in a few dozen bytes: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    noise((64, 64), seed=9).save(buf, format="JPEG", quality=90)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


# name -> (bytes or PIL image writer, reason fragment). Written into trainA.
BAD = {
    "truncated.jpg": (truncated_jpeg, "truncated or corrupt"),
    "random_bytes.jpg": (lambda: np.random.default_rng(1).bytes(3000), "not an image"),
    "empty.png": (lambda: b"", "empty file"),
    "bomb.png": (lambda: _png(Image.new("L", (1200, 1200))), "decompression bomb"),  # cap lowered below
    "bomb_header.png": (lambda: png_header_only(30000, 30000), "decompression bomb"),  # Pillow's own limit
    "tiny.png": (lambda: _png(noise((8, 8))), "too small: 8x8, smaller than crop_size 16"),
}


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _p_with_transparency() -> bytes:
    im = Image.new("P", (40, 40), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return _png(im, transparency=1)  # palette index 1 is fully transparent


def _exif_rotated() -> bytes:
    """40x20, left half red, right half blue, tagged 'rotate 90 CW' (orientation 6)."""
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(im, "JPEG", exif=exif, quality=95)


# name -> (bytes, expected RGB of the (uniform) prepared image or None). Written into trainB.
CONVERTIBLE = {
    "cmyk.jpg": (lambda: _save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95), (255, 0, 0)),
    "gray.png": (lambda: _png(Image.new("L", (40, 40), 77)), (77, 77, 77)),
    "gray_alpha.png": (lambda: _png(Image.new("LA", (40, 40), (200, 0))), BACKGROUND),
    "palette_transparent.png": (_p_with_transparency, BACKGROUND),
    "rgba.png": (lambda: _png(Image.new("RGBA", (40, 40), (255, 0, 0, 128))), (128, 0, 127)),
    "sixteen_bit.png": (lambda: _png(Image.fromarray(np.full((40, 40), 65535, np.uint16))), (255, 255, 255)),
    "float.tif": (lambda: _save(Image.fromarray(np.full((40, 40), 0.5, np.float32)), "TIFF"), (128, 128, 128)),
    "one_bit.png": (lambda: _png(Image.new("1", (40, 40), 1)), (255, 255, 255)),
    "exif.jpg": (_exif_rotated, None),
}


def write_raw(root: Path, bad: dict | None = None, convertible: dict | None = None, n_good: int = 3) -> Path:
    """data/raw/mydata with n_good noise images per split, plus the given extra files."""
    raw = root / "data/raw/mydata"
    for k, split in enumerate(("trainA", "trainB", "testA", "testB")):
        (raw / split).mkdir(parents=True)
        for i in range(n_good):
            noise(seed=10 * k + i).save(raw / split / f"good{i}.png")
    for name, (make, _) in (bad or {}).items():
        (raw / "trainA" / name).write_bytes(make())
    for name, (make, _) in (convertible or {}).items():
        (raw / "trainB" / name).write_bytes(make())
    return raw


@pytest.fixture
def project(project, monkeypatch) -> Path:
    """conftest's project, with a pixel limit that bomb.png (1.44 MP) is over."""
    monkeypatch.setattr(images, "MAX_PIXELS", 1_000_000)
    return project


def test_skip_lists_every_bad_file_with_its_reason(project):
    raw = write_raw(project, BAD, CONVERTIBLE)
    (raw / "trainA" / "notes.txt").write_text("not an image, not an image extension")
    report = prepare.run(cfg())

    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {f"trainA/{n}" for n in BAD}
    for name, (_, fragment) in BAD.items():
        assert fragment in reasons[f"trainA/{name}"], (name, reasons[f"trainA/{name}"])
    assert report["counts"]["trainA"] == {"found": 3 + len(BAD), "used": 3, "skipped": len(BAD)}
    assert report["counts"]["trainB"]["used"] == 3 + len(CONVERTIBLE)
    assert report["ignored_files"] == ["trainA/notes.txt"]
    assert json.loads(Path("metrics/data_report.json").read_text())["skipped"] == report["skipped"]

    ds = PreparedDataset.open("data/prepared/mydata")
    assert ds.names("trainA") == ["good0.png", "good1.png", "good2.png"]
    assert ds.array("trainA").shape == (3, LOAD, LOAD, 3) and ds.array("trainA").dtype == np.uint8
    assert ds.array("testA").shape == (3, CROP, CROP, 3)
    m = ds.manifest
    assert m["counts"] == {"trainA": 3, "trainB": 3 + len(CONVERTIBLE), "testA": 3, "testB": 3}
    assert m["skipped"] == len(BAD) and m["load_size"] == LOAD and m["crop_size"] == CROP
    assert m["content_sha256"] == report["content_sha256"] and len(m["content_sha256"]) == 64
    assert sorted(p.name for p in Path("data/prepared").iterdir()) == ["mydata"]
    assert Image.open("reports/dataset_preview.png").size == (2 + 3 * (LOAD + 2), 2 + 2 * (LOAD + 2))


def test_converted_modes_give_the_right_pixels(project):
    write_raw(project, convertible=CONVERTIBLE)
    prepare.run(cfg())
    ds = PreparedDataset.open("data/prepared/mydata")
    rows = dict(zip(ds.names("trainB"), ds.array("trainB"), strict=True))
    for name, (_, rgb) in CONVERTIBLE.items():
        if rgb is not None:  # uniform images stay uniform through the resize
            assert np.abs(rows[name].astype(int) - rgb).max() <= 1, (name, rows[name][0, 0])
    exif = rows["exif.jpg"]  # upright: red on top, blue below
    assert exif[2, LOAD // 2, 0] > 200 and exif[2, LOAD // 2, 2] < 50
    assert exif[-3, LOAD // 2, 2] > 200 and exif[-3, LOAD // 2, 0] < 50


def test_conversions_at_full_resolution(tmp_path):
    rgba = tmp_path / "rgba.png"
    rgba.write_bytes(_png(Image.new("RGBA", (20, 20), (255, 0, 0, 128))))
    assert tuple(np.asarray(images.open_rgb(rgba, background=(255, 255, 255)))[0, 0]) == (255, 127, 127)

    ramp = tmp_path / "i16.png"  # 16-bit values scale to 8 bits, not clip
    ramp.write_bytes(_png(Image.fromarray(np.array([[0, 257, 32768, 65535]] * 4, np.uint16))))
    assert Image.open(ramp).mode == "I;16"
    assert np.asarray(images.open_rgb(ramp))[0, :, 0].tolist() == [0, 1, 128, 255]

    wide = np.array([[0, 1000, 70000]], np.int32)  # 32-bit beyond 16-bit range: stretched
    assert images.to_rgb(Image.fromarray(wide)).getpixel((2, 0)) == (255, 255, 255)

    rotated = tmp_path / "exif.jpg"
    rotated.write_bytes(_exif_rotated())
    im = images.open_rgb(rotated)
    assert im.size == (20, 40)  # 40x20 stored, 20x40 shown
    assert im.getpixel((10, 2))[0] > 200 and im.getpixel((10, 37))[2] > 200


@pytest.mark.parametrize("name", sorted(BAD))
def test_fail_policy_names_the_file_and_writes_nothing(project, name):
    write_raw(project, {name: BAD[name]})
    with pytest.raises(UserError) as e:
        prepare.run(cfg(on_bad_image="fail"))
    msg = str(e.value)
    assert msg.startswith(f"data/raw/mydata/trainA/{name}: {BAD[name][1]}") and "data.on_bad_image" in msg
    assert "\n" not in msg
    assert not Path("data/prepared").exists()


def test_failure_leaves_the_previous_prepared_data(project):
    raw = write_raw(project)
    prepare.run(cfg())
    before = {p: p.read_bytes() for p in Path("data/prepared").rglob("*") if p.is_file()}
    (raw / "testB" / "broken.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="broken.jpg: empty file"):
        prepare.run(cfg(on_bad_image="fail"))
    assert {p: p.read_bytes() for p in Path("data/prepared").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in project.joinpath("data").iterdir()) == ["prepared", "raw"]  # no temp left


def test_split_without_usable_images_is_an_error(project):
    raw = write_raw(project, n_good=1)
    (raw / "testB" / "good0.png").write_bytes(b"")
    with pytest.raises(UserError, match="testB: no usable images .*testB/good0.png: empty file"):
        prepare.run(cfg())
    assert json.loads(Path("metrics/data_report.json").read_text())["counts"]["testB"]["used"] == 0


def test_missing_raw_dataset_says_to_download(project):
    with pytest.raises(UserError, match="data/raw/mydata: not found; run `cyclegan download`"):
        prepare.run(cfg())


def test_train_test_duplicates_are_warned(project, capsys):
    raw = write_raw(project)
    shutil.copyfile(raw / "trainA/good1.png", raw / "testA/copy.png")
    noise(seed=1).save(raw / "testA/resaved.bmp")  # same pixels, other format
    report = prepare.run(cfg())
    group = sorted(["testA/copy.png", "testA/resaved.bmp", "trainA/good1.png"])
    assert report["duplicates"]["train_test"] == [group]
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "warning: 1 image(s) appear in both a training and a test split (e.g. testA/copy.png = " in err
    assert report["warnings"]


def test_targets_stay_aligned_with_their_test_images(project):
    raw = project / "data/raw/toy_horse2zebra"
    toy.generate(raw, image_size=16, n_train_a=2, n_train_b=2, n_test=3, seed=0)
    (raw / "testA_target/00001.png").unlink()
    report = prepare.run(cfg("toy_horse2zebra"))
    ds = PreparedDataset.open("data/prepared/toy_horse2zebra")
    assert ds.names("testA") == ds.names("testA_target") == ["00000.png", "00002.png"]
    assert len(ds.array("testA_target")) == 2 and len(ds.array("testB_target")) == 3
    expected = np.asarray(Image.open(raw / "testA_target/00002.png").resize((CROP, CROP), Image.BICUBIC))
    assert np.array_equal(ds.array("testA_target")[1], expected)
    assert {s["file"] for s in report["skipped"]} == {"testA/00001.png", "testA_target/00001.png"}
    with pytest.raises(UserError, match="testA_target/00001.png: missing; every testA/ image needs a file"):
        prepare.run(cfg("toy_horse2zebra", on_bad_image="fail"))


def test_worker_processes_give_identical_arrays(project):
    write_raw(project, BAD, CONVERTIBLE)
    serial = prepare.run(cfg(), workers=1)["content_sha256"]
    assert prepare.run(cfg(), workers=2)["content_sha256"] == serial


def test_horse2zebra_grayscale_images_come_out_rgb_like_the_official_resize(project):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found: needs the shared horse2zebra copy (../shared/datasets)")
    raw = project / "data/raw/horse2zebra"
    for split, names in {"trainA": ["n02381460_1001.jpg"], "trainB": [*GRAY, COLOUR],
                         "testA": ["n02381460_1000.jpg"], "testB": ["n02391049_100.jpg"]}.items():
        (raw / split).mkdir(parents=True)
        for n in names:
            shutil.copyfile(SHARED / split / n, raw / split / n)
    assert [Image.open(raw / "trainB" / n).mode for n in GRAY] == ["L", "L"]
    report = prepare.run(cfg("horse2zebra", load_size=286, crop_size=256))
    assert report["source_modes"] == {"L": 2, "RGB": 4}
    ds = PreparedDataset.open("data/prepared/horse2zebra")
    rows = dict(zip(ds.names("trainB"), ds.array("trainB"), strict=True))
    from torchvision import transforms  # the official pipeline's resize, for reference

    official = transforms.Resize([286, 286], transforms.InterpolationMode.BICUBIC)
    for n in [*GRAY, COLOUR]:
        assert rows[n].shape == (286, 286, 3)
        assert np.array_equal(rows[n], np.asarray(official(Image.open(raw / "trainB" / n).convert("RGB"))))
    for n in GRAY:
        assert np.array_equal(rows[n][..., 0], rows[n][..., 2])
