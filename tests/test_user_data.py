"""Data users bring, and experiments run side by side: nothing a user does bricks the workspace.

A dataset folder assembled from links (to images, to a non-image, dangling, to a folder, to a
device), with a FIFO, a socket and the usual bad files, runs through the real `dvc repro` under
data.on_bad_image: skip with every skipped entry listed; a failure of each stage leaves DVC usable;
three queued experiments run two at a time into the one MLflow store; a full disk is one line.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cyclegan import fileio
from cyclegan.config import config_from_dict
from cyclegan.errors import UserError
from cyclegan.stages import download, prepare
from helpers import (TINY, VENV_BIN, make_project, merge, pipeline_repo, project_env, read_losses, run, tracking_uri,
                     wait_for, wait_for_experiments)

DVC = str(VENV_BIN / "dvc")
CYCLEGAN = str(VENV_BIN / "cyclegan")

# TINY on 32 px user images, on the CPU whatever the machine has (the queue test gives workers
# CUDA_VISIBLE_DEVICES values that need not name real GPUs). The baseline's lambda_identity is none
# of the queued sweep's 0, 0.5, 1: an experiment equal to the baseline would not run at all.
PARAMS = merge(TINY, {
    "lambda_identity": 0.25,
    "data": {"load_size": 32, "crop_size": 32},
    "train": {"log_every": 4, "checkpoint_every": 8, "device": "cpu"},
    "eval": {"batch_size": 8, "n_samples": 2, "device": "cpu"},
})


def noise(path: Path, seed: int, size: tuple[int, int] = (40, 40), mode: str = "RGB") -> Path:
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    (rgb if mode == "RGB" else rgb.convert(mode)).save(path)
    return path


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def make_socket(path: Path) -> None:
    # A socket's path must fit in 108 bytes; pytest's tmp paths can be longer, the name cannot.
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind(path.name)
        s.close()  # the socket file stays
    finally:
        os.chdir(here)


def make_user_folder(base: Path, n_train: int = 8, n_test: int = 4) -> tuple[Path, dict[str, str]]:
    """A dataset folder as users assemble them: good images, links, odd entries and bad files.

    Returns the folder and {entry: fragment of the reason it must be skipped for}.
    """
    folder, elsewhere = base / "my data", base / "elsewhere"
    (elsewhere / "folder").mkdir(parents=True)
    for k, split in enumerate(("trainA", "trainB", "testA", "testB")):
        (folder / split).mkdir(parents=True)
        for i in range(n_train if split.startswith("train") else n_test):
            noise(folder / split / f"good{i}.png", seed=100 * k + i)
    noise(elsewhere / "target.png", seed=1)
    noise(elsewhere / "target2.png", seed=2)
    noise(elsewhere / "folder" / "inside.png", seed=3)
    (elsewhere / "notes.txt").write_text("not an image")
    # Links users make: absolute and relative ones to images (followed, used) ...
    os.symlink(elsewhere / "target.png", folder / "trainA" / "linked.png")
    os.symlink(Path("..", "..", "elsewhere", "target2.png"), folder / "trainB" / "linked_relative.png")
    # ... to a non-image (followed, then refused by the decoder), and ones without content.
    os.symlink(elsewhere / "notes.txt", folder / "testA" / "notes.jpg")
    os.symlink(elsewhere / "gone.jpg", folder / "testB" / "x_dangling.jpg")
    os.symlink(elsewhere / "folder", folder / "trainA" / "more")
    os.symlink("/dev/null", folder / "testB" / "null.jpg")
    os.mkfifo(folder / "testA" / "pipe.png")
    make_socket(folder / "testA" / "socket.png")
    # The usual bad files, and odd modes and names that are fine.
    (folder / "trainB" / "truncated.jpg").write_bytes(truncated_jpeg())
    (folder / "trainB" / "empty.png").write_bytes(b"")
    (folder / "testB" / "random.jpg").write_bytes(np.random.default_rng(1).bytes(3000))
    noise(folder / "trainA" / "tiny.png", seed=4, size=(8, 8))
    noise(folder / "trainA" / "cmyk.jpg", seed=5, mode="CMYK")
    noise(folder / "trainB" / "gray_alpha.png", seed=6, mode="LA")
    noise(folder / "testB" / "zèbre à rayures.png", seed=7)
    (folder / "trainA" / ".DS_Store").write_bytes(b"\0\1")  # hidden: never data, never listed
    expected = {
        "trainA/more": "symbolic link to a folder",
        "trainA/tiny.png": "too small",
        "trainB/truncated.jpg": "truncated or corrupt",
        "trainB/empty.png": "empty file",
        "testA/notes.jpg": "not an image",
        "testA/pipe.png": "a FIFO",
        "testA/socket.png": "a socket",
        "testB/x_dangling.jpg": "dangling symbolic link",
        "testB/null.jpg": "symbolic link to a device",
        "testB/random.jpg": "not an image",
    }
    return folder, expected


def odd_entries(top: Path) -> list[str]:
    """Everything under `top` that is neither a regular file nor a real folder."""
    odd = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                odd.append(os.path.join(dirpath, name))
    return odd


def listing(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


def cfg(dataset: str, **data):
    return config_from_dict(merge(PARAMS, {"data": {"dataset": dataset, **data}}))


# --- download and prepare, in this process ---------------------------------------------------------

def test_links_are_followed_and_entries_without_content_listed(project, tmp_path):
    folder, expected = make_user_folder(tmp_path)
    download.run(cfg(str(folder)))
    raw = project / "data/raw/my data"
    assert odd_entries(project / "data") == []
    # The target's content, not the link: relative links would dangle from data/raw.
    assert (raw / "trainA/linked.png").read_bytes() == (tmp_path / "elsewhere/target.png").read_bytes()
    assert (raw / "trainB/linked_relative.png").read_bytes() == (tmp_path / "elsewhere/target2.png").read_bytes()
    assert not (raw / "trainA/more").exists() and not (raw / "trainA/.DS_Store").exists()

    report = prepare.run(cfg(str(folder)))
    listed = {x["file"]: x["reason"] for x in report["skipped"]}
    assert set(listed) == set(expected)
    for entry, reason in expected.items():
        assert reason in listed[entry], (entry, listed[entry])
    assert report["images_skipped"] == len(expected)
    for split, c in report["counts"].items():
        assert c["found"] == c["used"] + c["skipped"], split
    # trainA: 8 good, linked.png and cmyk.jpg used; tiny.png and the link to a folder skipped.
    assert report["counts"]["trainA"] == {"found": 12, "used": 10, "skipped": 2}
    # testB: 4 good and the non-ASCII name used; the dangling link, /dev/null and random bytes skipped.
    assert report["counts"]["testB"] == {"found": 8, "used": 5, "skipped": 3}
    assert json.loads((project / "metrics/data_report.json").read_text())["skipped"] == report["skipped"]


def test_fail_stops_download_at_an_entry_without_content_and_keeps_what_was_there(project, tmp_path):
    folder, _ = make_user_folder(tmp_path)
    download.run(cfg(str(folder)))
    raw = project / "data/raw/my data"
    before = listing(raw)
    with pytest.raises(UserError) as e:
        download.run(cfg(str(folder), on_bad_image="fail"))
    assert re.fullmatch(r".*/my data/trainA/more: symbolic link to a folder \(.*\), not to a file; remove it "
                        r"or "
                        r"put the file itself there, or set data.on_bad_image: skip in params.yaml", str(e.value))
    assert listing(raw) == before
    # prepare under fail refuses data/raw made under skip, as it refuses a bad image.
    with pytest.raises(UserError, match=r"my data/trainA/more: symbolic link to a folder .*on_bad_image: skip"):
        prepare.run(cfg(str(folder), on_bad_image="fail"))


def test_a_split_of_broken_links_says_what_they_are(project, tmp_path):
    folder, _ = make_user_folder(tmp_path)
    for f in (folder / "testA").iterdir():
        f.unlink()
    os.symlink(tmp_path / "nowhere.png", folder / "testA" / "a.png")
    with pytest.raises(UserError, match=r"testA holds no images .*; 1 entries there are not files, e\.g\. "
                                        r"testA/a\.png: dangling symbolic link"):
        download.run(cfg(str(folder)))


# --- killed writers, full disks, a store opened by several processes --------------------------------

def test_a_killed_writer_s_temp_folder_is_removed_by_the_next_write(tmp_path):
    dest = tmp_path / "data" / "raw" / "my data"
    # A real process, killed inside atomic_dir, as a download killed while copying would be.
    code = ("import os, signal, sys; from pathlib import Path; from cyclegan.fileio import atomic_dir\n"
            "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
            "    (tmp / 'half.png').write_bytes(b'x')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(dest)])
    assert proc.wait(timeout=120) == -signal.SIGKILL
    left = [p.name for p in dest.parent.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".my data.{proc.pid}.") and left[0].endswith(".tmp")

    live = dest.parent / f".my data.{os.getpid()}.other.tmp"  # a live writer's: not touched
    live.mkdir()
    with fileio.atomic_dir(dest) as tmp:
        assert not (dest.parent / left[0]).exists()  # gone when the next write starts
        (tmp / "a.png").write_bytes(b"y")
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted([live.name, "my data"])


def test_parallel_first_use_of_a_fresh_mlflow_store(tmp_path):
    """Queued experiments of a new project open the not yet existing store at once: MLflow's
    table creation and migrations must not run twice concurrently (alembic errors)."""
    code = ("import os, sys, time; from cyclegan import tracking; import mlflow\n"
            "open(sys.argv[1] + '.ready', 'w').close()\n"
            "while not os.path.exists('go'): time.sleep(0.001)\n"
            "mlflow = tracking._mlflow(); tracking._use_experiment(mlflow)\n"
            "with mlflow.start_run(): mlflow.log_metric('x', 1.0)\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("*.ready"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()  # all three at once, their imports done
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-1500:] for o in outputs)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(tmp_path))
    assert len(client.search_runs([client.get_experiment_by_name("cyclegan").experiment_id])) == 3


def can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", "/mnt"], capture_output=True)
    return probe.returncode == 0


# Run inside `unshare -rm` (its own mount namespace, as root there): put a tmpfs over a folder,
# holding what the folder held and `headroom_kb` more, then run the commands; print their results.
FULL_DISK = """
import json, shutil, subprocess, sys, tempfile
folder, headroom_kb, commands, cwd = json.loads(sys.argv[1])
keep = tempfile.mkdtemp()
shutil.copytree(folder, keep, symlinks=True, dirs_exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", folder], check=True)
shutil.copytree(keep, folder, symlinks=True, dirs_exist_ok=True)
shutil.rmtree(keep)
used = int(subprocess.run(["df", "-k", "--output=used", folder], capture_output=True, text=True).stdout.split()[-1])
subprocess.run(["mount", "-o", f"remount,size={used + headroom_kb}k", folder], check=True)
out = []
for cmd in commands:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    out.append({"rc": p.returncode, "out": p.stdout + p.stderr})
print(json.dumps(out))
"""


def on_a_full_disk(folder: Path, commands: list[list[str]], cwd: Path, env: dict, headroom_kb: int = 8) -> list[dict]:
    arg = json.dumps([str(folder), headroom_kb, commands, str(cwd)])
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", FULL_DISK, arg], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def one_error_line(output: str, stage: str) -> str:
    """The one `cyclegan <stage>: error: ...` line of a failed command, and no traceback."""
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("cyclegan ") and ": error: " in line]
    assert len(lines) == 1 and lines[0].startswith(f"cyclegan {stage}: error: "), output[-3000:]
    return lines[0]


# Names and sha256 of every file under a folder, and its hidden entries (temp folders) too.
SNAPSHOT = ("import hashlib, json, os, sys\n"
            "print(json.dumps(sorted((os.path.relpath(os.path.join(d, f), sys.argv[1]),"
            " hashlib.sha256(open(os.path.join(d, f), 'rb').read()).hexdigest())"
            " for d, _, fs in os.walk(sys.argv[1]) for f in fs)))")


def snapshot(folder: Path) -> list:
    return json.loads(subprocess.run([sys.executable, "-c", SNAPSHOT, str(folder)], capture_output=True,
                                     text=True, check=True).stdout)


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs `unshare -rm` and tmpfs mounts to fill a disk")
def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path):
    folder, _ = make_user_folder(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(merge(PARAMS, {"data": {"dataset": str(folder)}})))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run([CYCLEGAN, "download"], project, env)
    before = snapshot(project / "data")
    # data/ nearly full: room for the headers of prepare's .npy files (written through memory maps,
    # sparse ones die of SIGBUS when the disk fills) but not for the pixels, nor for a new copy of
    # the user's folder (other file system: no hard links).
    results = on_a_full_disk(project / "data", [[CYCLEGAN, "prepare"], [CYCLEGAN, "download"],
                                                [sys.executable, "-c", SNAPSHOT, "data"]], project, env,
                             headroom_kb=32)
    for result, stage in zip(results, ("prepare", "download")):
        assert result["rc"] == 2, result["out"][-3000:]
        line = one_error_line(result["out"], stage)
        assert "No space left on device while writing its outputs; free disk space" in line
    # On the full disk, after both: what download had written, and nothing else (no temp folders).
    assert json.loads(results[2]["out"]) == before


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs `unshare -rm` and tmpfs mounts to fill a disk")
def test_training_on_a_full_disk_stops_with_one_line(tmp_path):
    make_project(tmp_path)
    (tmp_path / "models").mkdir()
    # models/ full: the first checkpoint does not fit (torch's own file writer said "unexpected pos").
    results = on_a_full_disk(tmp_path / "models", [[CYCLEGAN, "train"], [sys.executable, "-c", SNAPSHOT, "models"]],
                             tmp_path, project_env(tmp_path))
    assert results[0]["rc"] == 2, results[0]["out"][-3000:]
    assert "No space left on device while writing its outputs" in one_error_line(results[0]["out"], "train")
    assert [f for f, _ in json.loads(results[1]["out"]) if "step_" in f] == []  # no partial checkpoint


# --- the real pipeline --------------------------------------------------------------------------------

@dataclass(frozen=True)
class UserProject:
    root: Path
    env: dict
    base: Path
    folder: Path
    expected: dict[str, str]


@pytest.fixture(scope="module")
def user_project(tmp_path_factory) -> UserProject:
    """`dvc repro` of PARAMS on make_user_folder's folder, committed: the baseline of the tests below."""
    base = tmp_path_factory.mktemp("user")
    folder, expected = make_user_folder(base)
    root, env = pipeline_repo(base / "project", merge(PARAMS, {"data": {"dataset": str(folder)}}))
    env = {**env, "OMP_NUM_THREADS": "1"}
    run([DVC, "repro"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "baseline"], root, env)
    return UserProject(root, env, base, folder, expected)


def copy_of(project: UserProject, dest: Path) -> Path:
    shutil.copytree(project.root, dest, symlinks=True)
    return dest


def set_params(root: Path, **dotted) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = params
        for p in parents:
            node = node[p]
        node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_a_users_folder_with_links_and_bad_files_runs_through_dvc_repro(user_project):
    p = user_project
    assert odd_entries(p.root / "data") == []
    report = json.loads((p.root / "metrics/data_report.json").read_text())
    listed = {x["file"]: x["reason"] for x in report["skipped"]}
    assert set(listed) == set(p.expected)
    for entry, reason in p.expected.items():
        assert reason in listed[entry], (entry, listed[entry])
    manifest = json.loads((p.root / "data/prepared/my data/manifest.json").read_text())
    assert {"linked.png", "cmyk.jpg"} <= set(manifest["files"]["trainA"])
    assert "zèbre à rayures.png" in manifest["files"]["testB"]
    evaluation = json.loads((p.root / "metrics/eval.json").read_text())
    assert math.isfinite(evaluation["fid_A2B"]) and math.isfinite(evaluation["fid_B2A"])
    status = run([DVC, "status"], p.root, p.env)
    assert "changed" not in status.stdout.replace("always changed", "")


def set_up_bad_file(root: Path, project: UserProject) -> dict:
    set_params(root, **{"data.on_bad_image": "fail"})
    return {}


def set_up_full_raw(root: Path, project: UserProject) -> dict:
    return {"full_disk": "data/raw"}  # download always runs, and data/raw is persistent: not emptied by DVC


def regular_files_only(folder: Path, names: list[str]) -> list[str]:
    """copytree's ignore: links, FIFOs and sockets (real folders are kept)."""
    return [n for n in names if os.path.islink(folder / n) or not (os.path.isdir(folder / n) or os.path.isfile(folder / n))]


def set_up_corrupt_image(root: Path, project: UserProject) -> dict:
    # The folder's regular files only, bad images included: download passes under fail, prepare not.
    clean = project.base / "regular files only"
    if not clean.exists():
        shutil.copytree(project.folder, clean, ignore=lambda d, names: regular_files_only(Path(d), names))
    set_params(root, **{"data.dataset": str(clean), "data.on_bad_image": "fail"})
    return {}


def set_up_batch_too_big(root: Path, project: UserProject) -> dict:
    set_params(root, **{"train.batch_size": 1000})
    return {}


def set_up_no_gpu(root: Path, project: UserProject) -> dict:
    set_params(root, **{"eval.device": "cuda"})
    return {"CUDA_VISIBLE_DEVICES": ""}  # no GPU, on any machine


def set_up_missing_weights(root: Path, project: UserProject) -> dict:
    set_params(root, **{"eval.inception_weights": str(root / "no-such-weights.pth")})
    return {}


# case: (stage, the setup, what its one line says)
FAILURES = {
    "download, bad file": ("download", set_up_bad_file, r"trainA/more: symbolic link to a folder "
                                                        r".*on_bad_image: skip"),
    "download, full disk": ("download", set_up_full_raw, r"No space left on device while writing its outputs"),
    "prepare, corrupt image": ("prepare", set_up_corrupt_image, r"trainA/tiny\.png: too small: "
                                                                r"8x8.*on_bad_image: skip"),
    "train, bad param": ("train", set_up_batch_too_big, r"train\.batch_size \(1000\) exceeds the dataset"),
    "translate, bad param": ("translate", set_up_no_gpu, r"eval\.device is 'cuda' but no CUDA device is "
                                                         r"visible"),
    "evaluate, bad param": ("evaluate", set_up_missing_weights,
                            r"eval\.inception_weights: .*no-such-weights\.pth not found"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FAILURES))
def test_after_a_stage_fails_dvc_still_works_and_repro_says_the_same(user_project, tmp_path, case):
    stage, set_up, says = FAILURES[case]
    root = copy_of(user_project, tmp_path / "project")
    extra = set_up(root, user_project)
    full_disk = extra.pop("full_disk", None)
    env = {**user_project.env, **extra}
    commands = [[DVC, "repro"], [DVC, "status"], [DVC, "repro"]]
    if full_disk:
        if not can_mount_tmpfs():
            pytest.skip("needs `unshare -rm` and tmpfs mounts to fill a disk")
        results = on_a_full_disk(root / full_disk, commands, root, env)
    else:
        results = []
        for cmd in commands:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
            results.append({"rc": proc.returncode, "out": proc.stdout + proc.stderr})
    first, status, again = results
    assert first["rc"] != 0 and f"failed to reproduce '{stage}'" in first["out"], first["out"][-3000:]
    line = one_error_line(first["out"], stage)
    assert re.search(says, line), line
    assert status["rc"] == 0, status["out"][-3000:]
    assert again["rc"] != 0 and one_error_line(again["out"], stage) == line
    assert odd_entries(root / "data") == []


@pytest.mark.slow
def test_a_report_killed_midway_leaves_dvc_usable_and_the_next_repro_finishes(user_project, tmp_path):
    root = copy_of(user_project, tmp_path / "project")
    set_params(root, **{"eval.n_samples": 1})  # only report reads it
    env = {**user_project.env, "PYTHONUNBUFFERED": "1"}
    dvc = subprocess.Popen([DVC, "repro"], cwd=root, env=env, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in dvc.stdout:
        seen.append(line)
        if "Running stage 'report'" in line:
            break
    time.sleep(1.0)  # inside the stage: its imports alone take longer
    assert dvc.poll() is None, "".join(seen)
    os.killpg(dvc.pid, signal.SIGKILL)  # dvc and the report it runs
    dvc.wait(timeout=30)
    dvc.stdout.close()
    run([DVC, "status"], root, env)
    again = run([DVC, "repro"], root, env)
    assert "Running stage 'report'" in again.stdout and "Running stage 'train'" not in again.stdout
    assert (root / "reports/index.html").read_text().endswith("</html>\n")


# README (Experiments): a worker keeps the environment it was started in, and `dvc queue start -j N`
# starts the workers 1..N not up yet; so each call adds one, once the previous one is up.
ONE_WORKER_PER_GPU = """
for gpu in 0 1; do
  CUDA_VISIBLE_DEVICES=$gpu dvc queue start -j $((gpu + 1))
  until [ "$(dvc queue status | awk '/Worker status/ {print $3 + $5}')" -gt $gpu ]; do sleep 1; done
done
"""


def worker_logs(root: Path) -> str:
    return "\n".join(f"{p.name}:\n{p.read_text()[-2000:]}" for p in sorted((root / ".dvc/tmp/exps/celery").glob("*.out")))


@pytest.mark.slow
def test_three_queued_experiments_two_at_a_time_each_with_its_own_run(user_project, tmp_path):
    root = copy_of(user_project, tmp_path / "project")
    # A project without an MLflow store yet: the workers create it (one at a time, mlflow.db.lock).
    (root / "mlflow.db").unlink()
    shutil.rmtree(root / "mlruns")
    env = user_project.env
    run([DVC, "exp", "run", "--queue", "-S", "lambda_identity=0,0.5,1"], root, env)
    run(["bash", "-c", ONE_WORKER_PER_GPU], root, env)  # the README's recipe: `dvc queue start -j 2`, one GPU each
    wait_for_experiments(root, env, 3, 500, "three queued experiments")
    status = wait_for(lambda: (s := run([DVC, "queue", "status"], root, env).stdout) and "0 active" in s and s,
                      120, "the queue's workers to stop", poll=5)
    tasks = [line.split()[-1] for line in status.splitlines()[1:] if line.split() and line.split()[0] != "Worker"]
    assert tasks == ["Success"] * 3, status + worker_logs(root)
    names = [line.split()[1] for line in status.splitlines()[1:4]]
    for name in names:
        log = run([DVC, "queue", "logs", name], root, env).stdout
        assert "database is locked" not in log and "resuming from" not in log, log[-3000:]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root))
    runs = client.search_runs([client.get_experiment_by_name("cyclegan").experiment_id])
    sweep = {r.data.params["lambda_identity"]: r for r in runs}
    assert sorted(sweep) == ["0.0", "0.5", "1.0"] and len(runs) == 3, [r.data.params["lambda_identity"] for r in runs]
    steps = int(read_losses(user_project.root / "metrics/train_losses.csv")[-1]["step"])
    logged = sorted({*range(4, steps + 1, 4), steps})
    for value, r in sweep.items():
        assert r.info.status == "FINISHED"
        assert float(r.data.params["identity_weight_effective"]) == 10 * float(value)
        # Every step once, from the first: no run resumed another's checkpoint or logged into another's.
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss_G_A")] == logged, value
        for key in ("fid_A2B", "kid_A2B", "fid_B2A", "kid_B2A"):
            assert math.isfinite(r.data.metrics[key]), (value, key)
        assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"train_losses.csv", "samples", "report"}
        grids = client.list_artifacts(r.info.run_id, "samples/A2B")
        assert [a.path for a in grids] == ["samples/A2B/epoch_0001.png", "samples/A2B/epoch_0002.png"], value
        page = Path(client.download_artifacts(r.info.run_id, "report/index.html", str(tmp_path))).read_text()
        assert r.info.run_id in page
        assert r.data.tags["dvc_exp_name"] in names
    assert len({r.info.artifact_uri for r in sweep.values()}) == 3
    assert all(r.info.artifact_uri.startswith((root / "mlruns").as_uri()) for r in sweep.values())
    assert {r.data.tags["cuda_visible_devices"] for r in sweep.values()} == {"0", "1"}, worker_logs(root)
    # Two at a time: some two runs overlapped.
    spans = sorted((r.info.start_time, r.info.end_time) for r in sweep.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans
