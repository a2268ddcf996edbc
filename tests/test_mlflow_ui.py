"""End to end: a `dvc exp run --queue` sweep of lambda_identity logs into a real `mlflow server`,
and the MLflow UI's compare-runs page, rendered by headless Chromium, shows the three runs with
their lambda_identity and FID.

The project's dvc.yaml, params.yaml and src/ are copied into a fresh git + DVC repo with tiny
params (32 px toy images, 12 training images per domain, 4 test images, ngf 8, two epochs); the
installed `cyclegan` runs the stages. Selenium drives Chromium through the system chromedriver
(given as the service's path, so Selenium Manager neither looks for nor downloads a driver) and
waits for the JS app to load the runs instead of guessing a fixed render time. With
CYCLEGAN_UPDATE_SCREENSHOT=1 the screenshot replaces docs/mlflow_compare.png (shown in the
README); otherwise it stays in the test's tmp folder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from helpers import (GIT_DVC_ENV, TINY, background_process, free_port, http_ok, merge, run, wait_for,
                     wait_for_experiments)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "mlflow_compare.png"
LAMBDAS = (0.0, 0.5, 1.0)
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
# TINY over the project's params.yaml.
PARAMS = merge(TINY, {
    "data": {"toy": {"image_size": 32, "n_train_a": 12, "n_train_b": 12, "n_test": 4}},
    "train": {"max_steps": 0, "log_every": 4, "device": "cpu"},
    "eval": {"batch_size": 4, "device": "cpu", "n_samples": 3},
})


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    return run(cmd, cwd, env, timeout=300).stdout


def dvc_project(tmp: Path, env: dict[str, str]) -> Path:
    """The project's pipeline in a fresh repo, with tiny params, committed."""
    repo = tmp / "project"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copytree(ROOT / "models/init", repo / "models/init")  # a dependency of the train stage
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(merge(params, PARAMS), sort_keys=False))
    # dvc.yaml lists the stage sources as deps; the installed package is what runs.
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run(["git", "init", "-q"], repo, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny pipeline"], repo, env)
    return repo


def _queue_states(repo: Path, env: dict[str, str]) -> dict[str, str]:
    """Experiment name -> state: queued, running, failed, or success (finished)."""
    shown = json.loads(_run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo, env))
    return {exp["name"]: ((exp.get("executor") or {}).get("state")) or "success"
            for entry in shown for exp in entry.get("experiments") or []}


def _section_lines(text: str, title: str) -> list[str]:
    """The innerText lines of one collapsible section of the compare page, without its toggle."""
    lines = text.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if lines[i] in ("Metrics", "Artifacts", "Tags")), len(lines))
    return [line for line in lines[start:end] if line.strip() and line != "Show diff only"]


def _metric_row(text: str, name: str, n_runs: int) -> list[str]:
    """Values of one metric, one per run column.

    The metrics grid lists its row names first, then its cells row by row (a virtualized grid
    renders names and cells as two blocks): row i holds cells i*n .. i*n+n-1.
    """
    lines = _section_lines(text, "Metrics")
    names = []
    for line in lines:
        try:
            float(line)
            break
        except ValueError:
            names.append(line)
    cells = lines[len(names):]
    i = names.index(name)
    return cells[i * n_runs:(i + 1) * n_runs]


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="chromium and chromedriver are not installed (Debian: apt-get install chromium "
                           "chromium-driver)")
def test_sweep_shows_up_in_mlflow_compare_page(tmp_path, tmp_path_factory):
    port = free_port()
    server_url = f"http://127.0.0.1:{port}"
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": server_url,
        "OMP_NUM_THREADS": "1",
        # The converted Inception weights are built once per test session (conftest.inception_cache).
        "CYCLEGAN_CACHE": str(tmp_path_factory.getbasetemp() / "cyclegan-cache"),
        "TORCH_HOME": str(tmp_path / "torch-home-empty"),
        **GIT_DVC_ENV,
    }
    server = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
              "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
              "--artifacts-destination", str(tmp_path / "artifacts")]
    # Without its background job runner (scorers, trace archival) the server starts faster.
    server_env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with background_process(server, tmp_path / "mlflow-server.log", server_env):
        repo = dvc_project(tmp_path, env)  # while the server starts
        wait_for(lambda: http_ok(f"{server_url}/health"), 180, "mlflow server /health", poll=2)

        dvc = [sys.executable, "-m", "dvc"]
        sweep = ",".join(f"{v:g}" for v in LAMBDAS)
        _run([*dvc, "exp", "run", "--queue", "-S", f"lambda_identity={sweep}"], repo, env)
        assert list(_queue_states(repo, env).values()) == ["queued"] * 3
        try:
            _run([*dvc, "queue", "start", "-j", "2"], repo, env)
            wait_for_experiments(repo, env, len(LAMBDAS), 600, "the queued experiments")
        finally:
            subprocess.run([*dvc, "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True, timeout=120)
        assert set(_queue_states(repo, env).values()) == {"success"}

        import mlflow

        client = mlflow.MlflowClient(tracking_uri=server_url)
        experiment = client.get_experiment_by_name("cyclegan")
        runs = client.search_runs([experiment.experiment_id])
        assert sorted(float(r.data.params["lambda_identity"]) for r in runs) == list(LAMBDAS)
        assert all(r.info.status == "FINISHED" and "fid_A2B" in r.data.metrics for r in runs)
        for r in runs:
            assert {a.path for a in client.list_artifacts(r.info.run_id, "report")} >= {"report/index.html"}
            # Both generators, as models of the run, through the server's artifact proxy.
            models = [client.get_logged_model(o.model_id) for o in client.get_run(r.info.run_id).outputs.model_outputs]
            assert sorted(m.name for m in models) == ["G_A", "G_B"]

        # `cyclegan compare` on the same sweep, from both sources; the first also tags each run
        # with the commit `dvc exp` made for it.
        for source in ("dvc", "mlflow"):
            _run(["cyclegan", "compare", "--source", source], repo, env)
            table = pd.read_csv(repo / "reports" / "compare.csv")
            assert list(table["lambda_identity"]) == list(LAMBDAS), source
        commits = {e["name"]: e["revs"][0]["rev"] for entry in json.loads(_run([*dvc, "exp", "show", "--json"], repo, env))
                   for e in entry.get("experiments") or []}
        runs = client.search_runs([experiment.experiment_id])
        assert {r.data.tags["dvc_exp_commit"] for r in runs} == {commits[r.data.tags["dvc_exp_name"]] for r in runs}
        by_id = {r.info.run_id: r for r in runs}

        # Columns in sweep order, for the screenshot; the checks below read the page's own order.
        in_order = [r.info.run_id for r in sorted(runs, key=lambda r: float(r.data.params["lambda_identity"]))]
        query = urllib.parse.urlencode({"runs": json.dumps(in_order), "experiments": json.dumps([experiment.experiment_id])})
        page = f"{server_url}/#/compare-runs?{query}"
        text, png = render_compare_page(page, tmp_path, by_id)

    # Run columns in the page's order; each column's lambda_identity and FID as the store has them.
    columns = _section_lines(text, "Run details")[0].split("\t")[1:]
    assert sorted(columns) == sorted(by_id)
    params = {line.split("\t")[0]: line.split("\t")[1:] for line in _section_lines(text, "Parameters")}
    assert [float(v) for v in params["lambda_identity"]] == [float(by_id[c].data.params["lambda_identity"]) for c in columns]
    fids = [float(v) for v in _metric_row(text, "fid_A2B", len(columns))]
    assert fids == [pytest.approx(by_id[c].data.metrics["fid_A2B"], rel=1e-3) for c in columns]
    for r in runs:
        assert r.info.run_name in text

    out = SCREENSHOT if os.environ.get("CYCLEGAN_UPDATE_SCREENSHOT") == "1" else tmp_path / SCREENSHOT.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)


def render_compare_page(url: str, tmp: Path, runs: dict[str, Any]) -> tuple[str, bytes]:
    """The compare page's visible text once every run and its metrics have loaded, and a screenshot
    with "Show diff only" on (the params and metrics that differ come first)."""
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1250", f"--user-data-dir={tmp / 'chromium'}"):
        options.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp / "chromedriver.log"))
    browser = webdriver.Chrome(options=options, service=service)

    def wait(condition, timeout: float, what: str):
        try:
            return WebDriverWait(browser, timeout, poll_frequency=0.5).until(condition)
        except TimeoutException:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")

    try:
        browser.get(url)
        run_names = [r.info.run_name for r in runs.values()]

        def loaded(driver) -> str | None:
            text = driver.execute_script("return document.body ? document.body.innerText : ''")
            done = (f"Comparing {len(runs)} Runs" in text and all(n in text for n in run_names)
                    and "fid_A2B" in text and "lambda_identity" in text)
            return text if done else None

        wait(loaded, 90, "the compare page to show every run")
        # Close the assistant side panel, fold the charts away (their default axes show no
        # metric of ours), and show only what differs between the runs.
        browser.execute_script("""
            const close = document.querySelector('button[aria-label="Close"]');
            if (close) close.click();
            for (const header of document.querySelectorAll('[role="button"][aria-expanded="true"]')) {
                if (header.textContent.trim() === "Visualizations") header.click();
            }
            for (const section of ["Parameters", "Metrics", "Tags"]) {
                const toggle = document.querySelector(`button[aria-label="${section} - Show diff only"]`);
                if (toggle && toggle.getAttribute("aria-checked") !== "true") toggle.click();
            }""")
        text = wait(lambda d: (t := loaded(d)) and "data.crop_size" not in t and "Parallel Coordinates" not in t and t,
                    30, "the diff-only view")
        return text, browser.get_screenshot_as_png()
    finally:
        browser.quit()
