"""What several test files share: tiny params, project folders in tmp, and running commands.

Imported as `from helpers import ...` (tests/ is on sys.path: pytest puts the folder of
tests/conftest.py there). Fixtures built on these live in tests/conftest.py; no test file imports
another.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cyclegan import checkpoint, paths
from cyclegan.datasets import toy
from cyclegan.config import config_from_dict
from cyclegan.prepared_data import MANIFEST

# --- tiers ---------------------------------------------------------------------------------------

# The tier of the test being set up (conftest.pytest_runtest_setup): fast, slow or long.
CURRENT_TIER: str | None = None


def require_tier(what: str) -> None:
    """Fail a `make test-fast` test that starts `what` (a server, a cluster, a browser, a DVC
    pipeline): such a test must be marked slow, so that the fast tier stays minutes."""
    if CURRENT_TIER == "fast":
        pytest.fail(f"a fast test starts {what}: mark it @pytest.mark.slow (README: Tests)")


# --- params --------------------------------------------------------------------------------------

# What every training test has: the smallest networks, one epoch at the full LR and one decayed,
# one thread.
TINY = {"model": {"ngf": 8, "ndf": 8}, "train": {"n_epochs": 1, "n_epochs_decay": 1, "threads": 1}}


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in, dicts key by key; neither argument is modified."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# The whole params.yaml of an in-process training project (`make_project`): 28 px crops of the toy
# images on CPU, every step logged, a checkpoint every 4 steps, 2 sample images.
TRAIN_PARAMS = merge(TINY, {
    "seed": 0,
    "data": {"dataset": "toy_horse2zebra", "load_size": 32, "crop_size": 28},
    "model": {"netG": "resnet_6blocks"},
    "train": {"log_every": 1, "checkpoint_every": 4, "device": "cpu"},
    "eval": {"n_samples": 2, "device": "cpu"},
})


def set_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params))


# --- project folders -----------------------------------------------------------------------------

def tracking_uri(root: Path) -> str:
    """The project's own MLflow store: a sqlite file in it."""
    return f"sqlite:///{root / 'mlflow.db'}"


def enter_project(mp: pytest.MonkeyPatch, root: Path) -> Path:
    """Make `root` the working directory, with its own MLflow store; `mp` undoes both."""
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", tracking_uri(root))
    return root


def write_prepared(root: Path, arrays: dict[str, np.ndarray], files: dict[str, list[str]],
                   content_sha256: str | None = None, dataset: str = "toy_horse2zebra") -> Path:
    """data/prepared/<dataset> as `prepare` writes it: <split>.npy, and manifest.json naming the
    source file of each image of `files`' splits."""
    prepared = root / paths.PREPARED / dataset
    prepared.mkdir(parents=True, exist_ok=True)
    for split, array in arrays.items():
        np.save(prepared / f"{split}.npy", array)
    manifest: dict = {"files": files}
    if content_sha256 is not None:
        manifest["content_sha256"] = content_sha256
    (prepared / MANIFEST).write_text(json.dumps(manifest))
    return prepared


def make_project(root: Path, n_a: int = 12, n_b: int = 10, n_test: int = 4, **overrides) -> dict:
    """A training project: params.yaml (TRAIN_PARAMS + overrides) and data/prepared/toy_horse2zebra.

    As `prepare` stores them: training images at load_size, test images resized to crop_size.
    Returns the params.
    """
    params = merge(TRAIN_PARAMS, overrides)
    set_params(root, params)
    load, crop = params["data"]["load_size"], params["data"]["crop_size"]
    raw = root / "raw"
    if not raw.exists():
        toy.generate(raw, image_size=load, n_train_a=n_a, n_train_b=n_b, n_test=n_test, seed=2017)
    arrays, files, digest = {}, {}, hashlib.sha256()
    for split in ("trainA", "trainB", "testA", "testB"):
        names = sorted(p.name for p in (raw / split).iterdir())
        size = load if split.startswith("train") else crop
        arrays[split] = np.stack([
            np.asarray(Image.open(raw / split / n).convert("RGB").resize((size, size), Image.BICUBIC))
            for n in names])
        files[split] = names
        digest.update(split.encode() + arrays[split].tobytes())
    write_prepared(root, arrays, files, content_sha256=digest.hexdigest())
    return params


# --- training runs and what they leave ----------------------------------------------------------

def run_dir(root: Path = Path(".")) -> Path:
    """The checkpoint folder of the one run in `root`: models/checkpoints/<fingerprint>/."""
    runs = [d for d in (root / paths.CHECKPOINTS).glob("*") if d.is_dir()]
    assert len(runs) <= 1, runs
    return runs[0].relative_to(root) if runs else paths.CHECKPOINTS / "no-run-yet"


def run_checkpoints(root: Path = Path(".")) -> list[Path]:
    """The checkpoint files of the one run in `root`, oldest first."""
    return checkpoint.list_checkpoints(root / run_dir(root))


def run_train(fresh: bool = False) -> None:
    """`cyclegan train` in this process, in the current folder; a UserError comes out as is."""
    from cyclegan.stages import train

    cfg = config_from_dict(yaml.safe_load(Path("params.yaml").read_text()))
    train.main(cfg, argparse.Namespace(fresh=fresh))


def read_losses(path: Path = paths.TRAIN_LOSSES) -> list[dict[str, str]]:
    """The loss plot, as strings: equal rows are equal to the last digit."""
    with open(path) as f:
        return list(csv.DictReader(f))


def generator_weights(path: Path) -> dict[str, torch.Tensor]:
    from cyclegan.generator_file import read_generator

    return read_generator(path)[2]


def mlflow_client(root: Path | None = None):
    """A client of `root`'s MLflow store, or of MLFLOW_TRACKING_URI's."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri(root) if root else os.environ["MLFLOW_TRACKING_URI"])


def run_ids(root: Path | None = None) -> list[str]:
    """The runs of `root`'s MLflow store (or MLFLOW_TRACKING_URI's), newest first."""
    client = mlflow_client(root)
    experiment = client.get_experiment_by_name("cyclegan")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    return [r.info.run_id for r in runs]


def run_id(root: Path | None = None) -> str:
    """The newest MLflow run of the store, the one a training in the project logs to."""
    return run_ids(root)[0]


def project_env(root: Path) -> dict[str, str]:
    """The environment of a `cyclegan` subprocess in project `root`: one thread, its own store."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": tracking_uri(root)}


# --- gradients -------------------------------------------------------------------------------------

def record_gradients(opt_G: torch.optim.Optimizer, opt_D: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Copies of the gradients each optimizer step is about to apply, in order, appended per step."""
    seen: list[torch.Tensor] = []
    for opt in (opt_G, opt_D):
        def step(*args, _opt=opt, _step=opt.step, **kwargs):
            seen.extend(p.grad.clone() for group in _opt.param_groups for p in group["params"])
            return _step(*args, **kwargs)
        opt.step = step
    return seen


def assert_same_gradients(ours: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Equal up to float rounding: within 1% in norm, tensor by tensor.

    Gradients, not weights: Adam divides by the gradient's size, so the rounding noise of a
    gradient that is 0 in exact arithmetic (the bias of a convolution feeding an InstanceNorm)
    becomes an update of up to lr. A norm, not the largest entry: rounding that moves one
    activation of a 7x7 map across a ReLU's kink changes a few entries by percents. A wrong loss
    or a wrong pairing of images changes gradients by their own size.
    """
    assert len(ours) == len(expected)
    for i, (g, h) in enumerate(zip(ours, expected)):
        error, scale = float((g - h).norm()), float(h.norm())
        assert error <= 1e-2 * scale + 1e-4, f"gradient tensor {i} {tuple(h.shape)}: |diff| {error:.3g}, |g| {scale:.3g}"


# --- commands --------------------------------------------------------------------------------------

# For subprocesses that commit to git or run DVC.
GIT_DVC_ENV = {"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
               "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `cmd` to its end; it must succeed (the failure shows the ends of its output)."""
    require_tier_for_command(cmd)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def require_tier_for_command(cmd: list[str]) -> None:
    """A command that runs a DVC pipeline (repro, exp run, queue start) belongs to the slow tier."""
    words = [Path(str(c)).name for c in cmd[:5]]
    if "dvc" in words:
        rest = words[words.index("dvc") + 1:]
        queued_only = rest[:2] == ["exp", "run"] and "--queue" in map(str, cmd)
        if rest[:1] == ["repro"] or (rest[:2] == ["exp", "run"] and not queued_only) or rest[:2] == ["queue", "start"]:
            require_tier(f"a DVC pipeline (`dvc {' '.join(rest[:2])}`)")


# --- DVC pipelines ----------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def dvc_env() -> dict[str, str]:
    """The environment of git and dvc commands: the venv's bin first on PATH (`dvc queue start`
    spawns its workers as `dvc`, found on PATH), and git identities."""
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **GIT_DVC_ENV}


def pipeline_repo(dest: Path, overrides: dict) -> tuple[Path, dict]:
    """A fresh git + DVC repo holding this project's pipeline files and source, with `overrides`."""
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, dest / name)
    # The train stage's dependency on the generators it may start from (train.init_from).
    shutil.copytree(ROOT / paths.INIT, dest / paths.INIT)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / ".dvc", dest / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    params = merge(yaml.safe_load((dest / "params.yaml").read_text()), overrides)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dvc_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store at the project root is under test
    run(["git", "init", "-q"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "init"], dest, env)
    return dest, env


# The pipeline of the slow tests (conftest.reproduced_pipeline): TINY over the project's
# params.yaml, 12 + 12 toy training images (2 epochs of 12 steps), 4 test images.
PIPELINE_PARAMS = merge(TINY, {
    "data": {"toy": {"image_size": 32, "n_train_a": 12, "n_train_b": 12, "n_test": 4}},
    "train": {"log_every": 4, "checkpoint_every": 8},
    "eval": {"batch_size": 4, "n_samples": 2},
})


@dataclass(frozen=True)
class Reproduced:
    repo: Path  # committed after `dvc repro`: outputs in the workspace and the DVC cache
    env: dict[str, str]  # of git and dvc commands in it
    stdout: str  # of its `dvc repro`


def copy_repo(src: Path, dest: Path) -> Path:
    """A copy of the git + DVC repo `src` (workspace, git, DVC cache) at `dest`, without DVC's temp
    folder (its hash cache keys on inodes, and queued runs' copies) and without the MLflow store
    (its experiment's artifact location is `src`'s own mlruns/: runs logged in the copy would
    write there)."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        if Path(folder) == src:
            return [n for n in names if n in ("mlflow.db", "mlflow.db.lock", "mlruns")]
        return ["tmp"] if Path(folder).name == ".dvc" else []

    shutil.copytree(src, dest, symlinks=True, ignore=ignore)
    return dest


# --- servers ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, poll: float = 1.0):
    """condition()'s first truthy value; the test fails, naming `what`, when `timeout` s pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (read in /proc: a zombie has exited, only its parent has yet to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def exp_refs(repo: Path) -> dict[str, str]:
    """Experiment name -> commit of each finished `dvc exp run` in `repo`, read from .git itself
    (refs/exps/<baseline>/<name>, loose or packed): a wait that calls no subprocess."""
    def is_experiment(parts: tuple[str, ...]) -> bool:  # not stash, celery/, exec/, temp/, apply/
        return len(parts) == 3 and len(parts[0]) == 2

    git = repo / ".git"
    refs = {}
    packed = git / "packed-refs"
    if packed.exists():
        for line in packed.read_text().splitlines():
            sha, _, ref = line.partition(" ")
            if ref.startswith("refs/exps/") and is_experiment(tuple(ref.split("/")[2:])):
                refs[ref.rsplit("/", 1)[1]] = sha
    exps = git / "refs" / "exps"
    for path in exps.rglob("*") if exps.exists() else ():
        if path.is_file() and path.suffix != ".lock" and is_experiment(path.relative_to(exps).parts):
            try:
                refs[path.name] = path.read_text().strip()
            except FileNotFoundError:  # being packed or moved
                pass
    return refs


def wait_for_experiments(repo: Path, env: dict[str, str], count: int, timeout: float, what: str,
                         failed_before: tuple[str, ...] = ()) -> dict[str, str]:
    """Wait until `count` experiments of `repo` have finished (their refs, checked twice a second);
    every 30 s `dvc queue status` says whether one failed (other than `failed_before`), which fails
    the test with its log. Returns exp_refs."""
    deadline = time.monotonic() + timeout
    next_status = time.monotonic() + 30
    while len(refs := exp_refs(repo)) < count:
        if time.monotonic() > next_status:
            status = run([str(VENV_BIN / "dvc"), "queue", "status"], repo, env).stdout
            failed = [line.split()[1] for line in status.splitlines()[1:]
                      if line.split()[-1:] == ["Failed"] and line.split()[1] not in failed_before]
            if failed:
                log = run([str(VENV_BIN / "dvc"), "queue", "logs", failed[0]], repo, env).stdout
                pytest.fail(f"{what}: {failed} failed; `dvc queue logs {failed[0]}`:\n{log[-3000:]}")
            next_status = time.monotonic() + 30
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} ({len(refs)} of {count} finished)")
        time.sleep(0.5)
    return refs


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def background_process(cmd: list[str], log: Path, env: dict[str, str] | None = None,
                       cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """A background process (a server, a launcher) in its own process group, ended with everything
    it started; only slow tests start one."""
    require_tier(f"a background process ({Path(cmd[0]).name})")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        yield proc
    finally:
        stop_process_group(proc, signal.SIGTERM, grace=15)


def stop_process_group(proc: subprocess.Popen, stop_signal=signal.SIGTERM, grace: float = 5.0) -> None:
    """`stop_signal` to the process group (a clean shutdown), SIGKILL after `grace` s, and SIGKILL to
    any child left once the leader is gone."""
    for sig, wait_s in ((stop_signal, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; children (postgres backends, weed's) go with the group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


class ScriptedServer:
    """An HTTP server on 127.0.0.1 serving `files` (path -> bytes, Range requests honoured) whose
    answers the test scripts, one action per request; its URL ends in `path`."""

    def __init__(self, path: str = ""):
        self.files: dict[str, bytes] = {}
        self.script: list[str] = []  # ok | 404 | 500 | drop | ignore_range | stall; then ok
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                action = server.script.pop(0) if server.script else "ok"
                rng = self.headers.get("Range")
                server.requests.append({"path": self.path, "range": rng, "action": action})
                data = server.files.get(self.path.lstrip("/"))
                if data is None or action == "404":
                    self.send_error(404)
                    return
                if action == "500":
                    self.send_error(500)
                    return
                if action == "stall":  # longer than the client's timeout
                    time.sleep(0.5)
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng and action != "ignore_range" else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if action == "drop":  # half the body, then the connection closes
                    body = body[: len(body) // 2]
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (stall)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
