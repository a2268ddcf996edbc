"""`cyclegan download`: registry, HTTP download (retries, resume), archive safety, verification.

A real HTTP server on 127.0.0.1 serves zips built from a few files of the shared horse2zebra copy;
the registry entry is given the subset's counts so the sha256 list still checks every file.
"""
from __future__ import annotations

import dataclasses
import io
import os
import shutil
import socket
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from cyclegan.datasets import archive as zip_safety
from cyclegan.datasets import http, markers, registry
from cyclegan.cli import main as cli_main
from cyclegan.config import config_from_dict
from cyclegan.prepared_data import SPLITS
from cyclegan.errors import UserError
from cyclegan.stages import download
from helpers import ScriptedServer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "horse2zebra"
PER_SPLIT = 3
SUBSET_COUNTS = dict.fromkeys(SPLITS, PER_SPLIT)


def need_shared() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found: these tests need the shared horse2zebra copy (../shared/datasets)")


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """The first PER_SPLIT official files of each split, in a folder named horse2zebra."""
    need_shared()
    root = tmp_path_factory.mktemp("subset") / "horse2zebra"
    for split in SPLITS:
        (root / split).mkdir(parents=True)
        for name in sorted(os.listdir(SHARED / split))[:PER_SPLIT]:
            shutil.copyfile(SHARED / split / name, root / split / name)
    return root


def zip_bytes(root: Path, top: str | None = "horse2zebra", extra: dict[str, bytes] | None = None,
              change: str | None = None) -> bytes:
    """A zip of the split folders of `root` (under `top`), plus `extra` members; `change`
    flips one byte of that file (relative to root)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                rel = path.relative_to(root).as_posix()
                data = path.read_bytes()
                if rel == change:
                    data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
                zf.writestr(f"{top}/{rel}" if top else rel, data)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def server():
    s = ScriptedServer(path="/datasets")
    yield s
    s.close()


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder as cwd, fast retries, the default dataset server unset."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv(http.BACKOFF_ENV, "0.001")
    monkeypatch.delenv(registry.URL_ENV, raising=False)
    return root


@pytest.fixture
def subset_registry(monkeypatch):
    """horse2zebra as served by these tests: the official sha256 list, the subset's counts."""
    info = dataclasses.replace(registry.REGISTRY["horse2zebra"], counts=SUBSET_COUNTS)
    monkeypatch.setitem(registry.REGISTRY, "horse2zebra", info)


def cfg(dataset: str, **data):
    return config_from_dict({"data": {"dataset": dataset, **data}})


def raw_listing(root: Path = Path("data/raw")) -> dict[str, bytes]:
    """Every file under data/raw with its bytes: how tests see 'nothing changed'."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_files(raw: Path, subset: Path) -> None:
    for split in SPLITS:
        expected = sorted(os.listdir(subset / split))
        assert sorted(os.listdir(raw / split)) == expected
        for name in expected:
            assert (raw / split / name).read_bytes() == (subset / split / name).read_bytes()


def serve_fetch(server: ScriptedServer, monkeypatch, data: bytes) -> None:
    server.files["datasets/horse2zebra.zip"] = data
    monkeypatch.setenv(registry.URL_ENV, server.url)


# ---------------------------------------------------------------------------------------------
# HTTP


def test_download_extracts_and_verifies(project, server, subset, subset_registry, monkeypatch):
    serve_fetch(server, monkeypatch, zip_bytes(subset))
    download.run(cfg("horse2zebra"))
    raw = project / "data/raw/horse2zebra"
    assert_same_files(raw, subset)
    marker = markers.read_marker(raw)
    assert marker["verified"] == "sha256 of every file" and marker["counts"] == SUBSET_COUNTS
    # Nothing else is left in data/raw: no .part, no temp folder.
    assert sorted(os.listdir(project / "data/raw")) == ["horse2zebra"]
    # A second run trusts the marker and does not download again.
    download.run(cfg("horse2zebra"))
    assert len(server.requests) == 1


def test_404_is_one_clear_error(project, server, subset_registry, monkeypatch):
    monkeypatch.setenv(registry.URL_ENV, server.url)
    with pytest.raises(UserError) as e:
        download.run(cfg("horse2zebra"))
    msg = str(e.value)
    assert f"{server.url}/horse2zebra.zip" in msg and "404" in msg and registry.URL_ENV in msg
    assert "\n" not in msg
    assert len(server.requests) == 1  # no retries on 404
    assert raw_listing() == {}


def test_server_error_is_retried(project, server, subset, subset_registry, monkeypatch):
    serve_fetch(server, monkeypatch, zip_bytes(subset))
    server.script = ["500", "500"]
    download.run(cfg("horse2zebra"))
    assert [r["action"] for r in server.requests] == ["500", "500", "ok"]
    assert_same_files(project / "data/raw/horse2zebra", subset)


def test_dropped_connection_resumes_with_range(project, server, subset, subset_registry, monkeypatch):
    data = zip_bytes(subset)
    serve_fetch(server, monkeypatch, data)
    server.script = ["drop"]
    download.run(cfg("horse2zebra"))
    first, second = server.requests
    assert first["range"] is None
    assert second["range"] == f"bytes={len(data) // 2}-"  # only the missing half was asked for
    assert_same_files(project / "data/raw/horse2zebra", subset)


def test_server_ignoring_range_restarts_cleanly(project, server, subset, subset_registry, monkeypatch):
    serve_fetch(server, monkeypatch, zip_bytes(subset))
    server.script = ["drop", "ignore_range"]
    download.run(cfg("horse2zebra"))
    assert server.requests[1]["range"] is not None and server.requests[1]["action"] == "ignore_range"
    assert_same_files(project / "data/raw/horse2zebra", subset)


def test_stalled_server_times_out_and_is_retried(project, server, subset, subset_registry, monkeypatch):
    serve_fetch(server, monkeypatch, zip_bytes(subset))
    monkeypatch.setattr(http, "TIMEOUT_S", 0.2)
    server.script = ["stall"]
    download.run(cfg("horse2zebra"))
    assert [r["action"] for r in server.requests] == ["stall", "ok"]
    assert_same_files(project / "data/raw/horse2zebra", subset)


def test_interrupted_download_keeps_part_then_resumes(project, server, subset, subset_registry, monkeypatch):
    data = zip_bytes(subset)
    serve_fetch(server, monkeypatch, data)
    monkeypatch.setattr(http, "RETRIES", 1)
    server.script = ["drop", "500"]
    with pytest.raises(UserError, match="cannot download"):
        download.run(cfg("horse2zebra"))
    part = project / "data/raw/.horse2zebra.zip.part"
    assert part.stat().st_size == len(data) // 2  # kept for the next run
    assert not (project / "data/raw/horse2zebra").exists()
    download.run(cfg("horse2zebra"))
    assert server.requests[-1]["range"] == f"bytes={len(data) // 2}-"
    assert not part.exists()
    assert_same_files(project / "data/raw/horse2zebra", subset)


def test_unreachable_server_is_one_line(project, subset_registry, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/datasets"
    monkeypatch.setenv(registry.URL_ENV, url)
    with pytest.raises(UserError) as e:
        download.run(cfg("horse2zebra"))
    msg = str(e.value)
    assert f"{url}/horse2zebra.zip" in msg and registry.URL_ENV in msg and "\n" not in msg
    assert raw_listing() == {}


# ---------------------------------------------------------------------------------------------
# Verification and archive safety


def test_wrong_checksum_names_the_file_and_changes_nothing(project, server, subset, subset_registry, monkeypatch):
    bad = f"testB/{sorted(os.listdir(subset / 'testB'))[1]}"
    serve_fetch(server, monkeypatch, zip_bytes(subset, change=bad))
    before_dir = project / "data/raw/horse2zebra"
    before_dir.mkdir(parents=True)
    (before_dir / "old.txt").write_text("what was there before")
    with pytest.raises(UserError, match=f"{bad} fails its sha256 check"):
        download.run(cfg("horse2zebra"))
    assert raw_listing() == {"horse2zebra/old.txt": b"what was there before"}


def test_incomplete_archive_fails_the_official_counts(project, server, subset, monkeypatch):
    # The real registry entry: a subset passes the sha256 list but not the official counts.
    serve_fetch(server, monkeypatch, zip_bytes(subset))
    with pytest.raises(UserError, match="trainA/ holds 3 images, the official horse2zebra has 1067"):
        download.run(cfg("horse2zebra"))
    assert raw_listing() == {}


def test_full_horse2zebra_verifies_against_the_official_list(project, monkeypatch):
    """The real check, on the real files: every sha256 and the official per-split counts."""
    need_shared()
    monkeypatch.setenv(registry.URL_ENV, str(SHARED.parent))  # a local folder holding horse2zebra/
    download.run(cfg("horse2zebra"))
    marker = markers.read_marker(project / "data/raw/horse2zebra")
    assert marker["counts"] == dict(registry.REGISTRY["horse2zebra"].counts)
    assert marker["verified"] == "sha256 of every file"


def test_file_not_in_the_official_list_is_refused(project, server, subset, subset_registry, monkeypatch):
    serve_fetch(server, monkeypatch, zip_bytes(subset, extra={"horse2zebra/trainA/intruder.jpg": b"x"}))
    with pytest.raises(UserError, match="trainA/intruder.jpg is not a file of the official horse2zebra"):
        download.run(cfg("horse2zebra"))
    assert raw_listing() == {}


def _symlink_member() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("horse2zebra/trainA/link.jpg")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("member, problem", [
    ("horse2zebra/../../evil.jpg", "climbs out"),
    ("/tmp/evil.jpg", "absolute path"),
    ("symlink", "symbolic link"),
])
def test_zip_slip_is_refused(project, server, subset, subset_registry, monkeypatch, member, problem):
    data = zip_bytes(subset)
    buf = io.BytesIO(data)
    with zipfile.ZipFile(buf, "a") as zf:
        if member == "symlink":
            zf.writestr(_symlink_member(), "/etc/passwd")
        else:
            zf.writestr(zipfile.ZipInfo(member), b"evil")
    serve_fetch(server, monkeypatch, buf.getvalue())
    with pytest.raises(UserError, match=f"refused.*{problem}"):
        download.run(cfg("horse2zebra"))
    assert raw_listing() == {}
    assert not (project.parent / "evil.jpg").exists()


def test_zip_bomb_is_refused_from_the_central_directory(project, server, subset_registry, monkeypatch):
    monkeypatch.setattr(zip_safety, "MAX_ARCHIVE_BYTES", 1 << 20)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for split in SPLITS:
            zf.writestr(f"horse2zebra/{split}/bomb.jpg", bytes(4 << 20))  # 4 MiB of zeros, ~4 kB zipped
    assert len(buf.getvalue()) < 100_000
    serve_fetch(server, monkeypatch, buf.getvalue())
    with pytest.raises(UserError, match="zip bomb"):
        download.run(cfg("horse2zebra"))
    assert raw_listing() == {}


def test_lying_sizes_are_caught_while_extracting(tmp_path, monkeypatch):
    """A central directory declaring 10 bytes for a 4 MiB member is refused at extraction.

    zipfile stops at the declared size and the CRC check fails; the byte count kept by
    safe_extract is the backstop should a reader ever trust the data instead.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("trainA/a.jpg", bytes(4 << 20))
    data = bytearray(buf.getvalue())
    cd = data.rindex(b"PK\x01\x02")  # central directory entry: uncompressed size at offset 24
    struct.pack_into("<I", data, cd + 24, 10)
    archive = tmp_path / "lying.zip"
    archive.write_bytes(bytes(data))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UserError, match="lying.zip: (refused|corrupt)"):
        zip_safety.safe_extract(archive, dest, label=str(archive))


def test_too_many_files_is_refused(tmp_path, subset, monkeypatch):
    archive = tmp_path / "many.zip"
    archive.write_bytes(zip_bytes(subset))
    monkeypatch.setattr(zip_safety, "MAX_ARCHIVE_FILES", 5)
    with pytest.raises(UserError, match="12 entries, more than the cap of 5"):
        zip_safety.safe_extract(archive, tmp_path, label=str(archive))


def test_truncated_zip_is_refused_and_removed(project, server, subset, subset_registry, monkeypatch):
    data = zip_bytes(subset)
    serve_fetch(server, monkeypatch, data[: len(data) * 2 // 3])
    with pytest.raises(UserError, match="not a valid zip archive"):
        download.run(cfg("horse2zebra"))
    assert raw_listing() == {}  # the bad download is not kept for a resume


# ---------------------------------------------------------------------------------------------
# Names, local sources, folders, the toy dataset


def test_cityscapes_is_refused_with_the_way_out(project):
    with pytest.raises(UserError, match="licence.*set data.dataset to that folder's path"):
        download.run(cfg("cityscapes"))


def test_unknown_name_lists_the_known_ones(project):
    with pytest.raises(UserError) as e:
        download.run(cfg("horse2zebro"))
    assert "'horse2zebro'" in str(e.value) and "monet2photo" in str(e.value) and "toy_horse2zebra" in str(e.value)


@pytest.mark.parametrize("as_url", [True, False], ids=["file-url", "folder"])
@pytest.mark.parametrize("top", ["horse2zebra", None], ids=["top-folder", "no-top-folder"])
def test_local_zip_via_env(project, subset, subset_registry, monkeypatch, tmp_path, as_url, top):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "horse2zebra.zip").write_bytes(zip_bytes(subset, top=top))
    monkeypatch.setenv(registry.URL_ENV, mirror.as_uri() if as_url else str(mirror))
    download.run(cfg("horse2zebra"))
    assert_same_files(project / "data/raw/horse2zebra", subset)
    assert (mirror / "horse2zebra.zip").exists()  # a local archive is read, never moved


def test_env_folder_without_the_dataset(project, tmp_path, monkeypatch):
    monkeypatch.setenv(registry.URL_ENV, str(tmp_path))
    with pytest.raises(UserError, match="holds neither apple2orange.zip nor apple2orange/"):
        download.run(cfg("apple2orange"))


def test_user_folder_is_validated_and_linked(project, subset, tmp_path):
    src = tmp_path / "my_data"
    shutil.copytree(subset, src)
    (src / "trainA" / "notes.txt").write_text("not an image")
    download.run(cfg(str(src)))
    raw = project / "data/raw/my_data"
    assert_same_files(raw, subset)  # notes.txt is not copied
    first = sorted(os.listdir(src / "trainA"))[0]
    assert os.path.samefile(raw / "trainA" / first, src / "trainA" / first)  # a hard link, same file system
    assert markers.read_marker(raw)["kind"] == "folder"

    shutil.rmtree(src / "testB")
    with pytest.raises(UserError, match=r"my_data has no testB/"):
        download.run(cfg(str(src)))
    (src / "testB").mkdir()
    with pytest.raises(UserError, match=r"testB holds no images"):
        download.run(cfg(str(src)))
    with pytest.raises(UserError, match="not found"):
        download.run(cfg(str(tmp_path / "nope")))
    with pytest.raises(UserError, match="does not end in a folder name"):
        download.run(cfg(".."))


def test_toy_dataset_is_generated_once_per_params(project):
    small = {"image_size": 16, "n_train_a": 3, "n_train_b": 2, "n_test": 2, "seed": 1}
    download.run(cfg("toy_horse2zebra", toy=small))
    raw = project / "data/raw/toy_horse2zebra"
    assert markers.split_counts(raw) == {"trainA": 3, "trainB": 2, "testA": 2, "testB": 2}
    assert len(os.listdir(raw / "testA_target")) == 2
    stamp = (raw / "trainA" / "00000.png").stat().st_mtime_ns
    download.run(cfg("toy_horse2zebra", toy=small))
    assert (raw / "trainA" / "00000.png").stat().st_mtime_ns == stamp  # skipped: same params
    before = (raw / "trainA" / "00000.png").read_bytes()
    download.run(cfg("toy_horse2zebra", toy={**small, "seed": 2}))
    assert (raw / "trainA" / "00000.png").read_bytes() != before


def test_cli_bad_dataset_is_one_line_exit_2(project, capsys):
    Path("params.yaml").write_text("data:\n  dataset: ./no_such_folder\n")
    assert cli_main(["download"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("cyclegan download: error: data.dataset: folder no_such_folder not found")


# --------------------------------------------------------------------------------------------
# A source's folder name


@pytest.mark.slow
def test_a_source_named_unlike_its_path_reaches_every_stage_under_one_folder(tmp_path, monkeypatch):
    """Each stage finds the dataset where download put it: under the source's name
    (datasets.sources.folder_name), not the last part of data.dataset. (evaluate and report open
    the prepared data as train and translate do: PreparedDataset.of.)"""
    from cyclegan.datasets import sources, toy
    from helpers import TRAIN_PARAMS, enter_project, merge, set_params

    folder = tmp_path / "zebra_photos_v2"
    toy.generate(folder, image_size=32, n_train_a=6, n_train_b=6, n_test=4, seed=0)

    def versioned(dataset: str) -> sources.Source | None:  # "zebras@v2": a folder source named zebras_v2
        if dataset != "zebras@v2":
            return None
        return sources.Source("folder", "zebras_v2", path=folder)

    monkeypatch.setattr(sources, "RESOLVERS", [versioned, *sources.RESOLVERS])
    (tmp_path / "project").mkdir()
    project = enter_project(monkeypatch, tmp_path / "project")
    set_params(project, merge(TRAIN_PARAMS, {"data": {"dataset": "zebras@v2"}, "train": {"max_steps": 2}}))
    for stage in ("download", "prepare", "train", "translate"):
        assert cli_main([stage]) == 0, stage
    assert sorted(p.name for p in (project / "data" / "raw").iterdir()) == ["zebras_v2"]
    assert sorted(p.name for p in (project / "data" / "prepared").iterdir()) == ["zebras_v2"]
    assert len(list((project / "data" / "translated" / "A2B").iterdir())) == 4
