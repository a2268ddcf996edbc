"""`cyclegan compare` on real sources: `dvc exp show --json` of a tiny DVC project run here (git +
DVC, one stage writing metrics the way the pipeline's stages name them) and a real MLflow store.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cyclegan import tracking
from cyclegan.comparison import (Comparison, differences, load_dvc, load_mlflow, parse_dvc_exp_show, plot_figure,
                                 plot_png, select, setting_columns, summarize, to_markdown)
from cyclegan.config import config_from_dict
from cyclegan.errors import UserError
from cyclegan.stages import compare
from helpers import dvc_env, run

# A stand-in for train + evaluate: metrics that depend on the params, in the pipeline's files.
STAGE_SCRIPT = """\
import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
lam, lr = p["lambda_identity"], p["train"]["lr"]
os.makedirs("metrics", exist_ok=True)
json.dump({"fid_A2B": 100 - 10 * lam, "kid_A2B": 0.1 - 0.01 * lam, "fid_B2A": 90 + lam,
           "kid_B2A": 0.05, "protocol": {"kid_subsets": 100}}, open("metrics/eval.json", "w"))
json.dump({"steps": 4, "identity_weight_effective": p["lambda_cycle"] * lam}, open("metrics/train.json", "w"))
"""


def _run(cmd: list[str], cwd: Path) -> str:
    return run(cmd, cwd, dvc_env(), timeout=300).stdout


def dvc(*args: str, cwd: Path) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd)


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    """Baseline lambda_identity 0.5 (not run), experiments at 0 and 1 (and lr 0.001), one queued."""
    repo = tmp_path_factory.mktemp("dvc_repo")
    (repo / "stage.py").write_text(STAGE_SCRIPT)
    (repo / "params.yaml").write_text(yaml.safe_dump(
        {"lambda_cycle": 10.0, "lambda_identity": 0.5, "train": {"lr": 0.0002, "n_epochs": 3}}))
    (repo / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          evaluate:
            cmd: {sys.executable} stage.py
            deps: [stage.py]
            params: [lambda_cycle, lambda_identity, train.lr]
            metrics:
              - metrics/eval.json:
                  cache: false
              - metrics/train.json:
                  cache: false
        """))
    _run(["git", "init", "-q"], repo)
    dvc("init", "-q", cwd=repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "baseline"], repo)
    dvc("exp", "run", "-q", "-n", "idt-0", "-S", "lambda_identity=0", cwd=repo)
    dvc("exp", "run", "-q", "-n", "idt-1", "-S", "lambda_identity=1", "-S", "train.lr=0.001", cwd=repo)
    dvc("exp", "run", "-q", "--queue", "-n", "idt-2", "-S", "lambda_identity=2", cwd=repo)
    return repo


@pytest.fixture(scope="module")
def exp_show(dvc_repo) -> list:
    return json.loads(dvc("exp", "show", "--json", cwd=dvc_repo))


@pytest.mark.slow
def test_parse_dvc_exp_show(exp_show):
    df = parse_dvc_exp_show(exp_show)
    by_name = df.set_index("experiment")
    # The queued experiment has no results; the workspace repeats idt-1 (the last run) and goes.
    assert set(by_name.index) == {"master", "idt-0", "idt-1"}
    assert by_name.loc["idt-0", "lambda_identity"] == 0
    assert by_name.loc["idt-1", "train.lr"] == pytest.approx(0.001)
    assert by_name.loc["idt-1", "fid_A2B"] == pytest.approx(90.0)
    assert by_name.loc["idt-0", "kid_A2B"] == pytest.approx(0.1)
    assert by_name.loc["idt-1", "identity_weight_effective"] == pytest.approx(10.0)
    assert by_name.loc["idt-0", "protocol.kid_subsets"] == 100
    # The baseline commit was never run: params, no metrics.
    assert by_name.loc["master", "lambda_identity"] == 0.5
    assert pd.isna(by_name.loc["master", "fid_A2B"])
    assert len(by_name.loc["idt-0", "id"]) == 7


def test_metric_never_hides_a_param():
    rev = {"rev": "a" * 40, "name": "x", "error": None,
           "data": {"params": {"params.yaml": {"data": {"steps": 5}}, "extra.yaml": {"data": {"k": 1}}},
                    "metrics": {"metrics/train.json": {"data": {"steps": 4}},
                                "metrics/eval.json": {"error": {"type": "FileNotFoundError"}}}}}
    df = parse_dvc_exp_show([{**rev, "experiments": None}])
    row = df.iloc[0]
    assert row["steps"] == 5 and row["metrics/train.json:steps"] == 4 and row["extra.yaml:k"] == 1
    assert row["id"] == "a" * 7


@pytest.mark.slow
def test_select_sorts_by_param_and_keeps_varying_params(dvc_repo):
    comparison = select(load_dvc(dvc_repo))
    table = comparison.table
    assert list(table["experiment"]) == ["idt-0", "idt-1"]  # master has no metrics
    assert comparison.metrics == ["fid_A2B", "kid_A2B", "fid_B2A", "kid_B2A"]
    # train.lr and the effective identity weight differ between the two; lambda_cycle does not.
    assert list(table.columns) == ["experiment", "id", "lambda_identity", "train.lr", "identity_weight_effective",
                                   "fid_A2B", "kid_A2B", "fid_B2A", "kid_B2A"]
    assert list(table["fid_A2B"]) == [100.0, 90.0]


@pytest.mark.slow
def test_select_errors_name_what_exists(dvc_repo):
    df = load_dvc(dvc_repo)
    with pytest.raises(UserError, match=r"--param lambda_idt: no experiment has it; known columns: "
                                        r".*lambda_identity"):
        select(df, "lambda_idt")
    with pytest.raises(UserError, match=r"--metric fid: no experiment has it"):
        select(df, "lambda_identity", ["fid"])
    with pytest.raises(UserError, match="no finished experiments"):
        select(pd.DataFrame())


def test_load_dvc_outside_a_repo(tmp_path):
    with pytest.raises(UserError, match="dvc exp show --json` failed"):
        load_dvc(tmp_path)


@pytest.mark.slow
def test_main_writes_csv_markdown_and_plot(dvc_repo, monkeypatch, capsys):
    monkeypatch.chdir(dvc_repo)
    compare.main(None, Namespace(param="lambda_identity", metrics=["fid_A2B", "kid_A2B"], source="dvc"))
    table = pd.read_csv(dvc_repo / "reports/compare.csv")
    assert list(table["experiment"]) == ["idt-0", "idt-1"]
    assert list(table.columns)[-2:] == ["fid_A2B", "kid_A2B"]
    # One run per setting: its value, no spread, and no difference can be judged.
    settings = pd.read_csv(dvc_repo / "reports/compare_settings.csv")
    assert list(settings["n"]) == [1, 1] and list(settings["fid_A2B_mean"]) == [100.0, 90.0]
    assert settings["fid_A2B_std"].isna().all()
    md = (dvc_repo / "reports/compare.md").read_text()
    runs = md[md.index("## Runs"):].splitlines()
    assert runs[2].startswith("| experiment | id | lambda_identity |") and runs[3].startswith("|---|")
    assert len(runs) == 6 and "| idt-0 |" in runs[4] and "| 100 |" in runs[4]
    assert "| fid_A2B | lambda_identity=1, train.lr=0.001 | lambda_identity=0, train.lr=0.0002 | -10 |  | n/a |" in md
    with Image.open(dvc_repo / "reports/compare.png") as im:
        assert im.format == "PNG" and im.width > 500
    out = capsys.readouterr()
    assert "idt-1" in out.out and "2 experiments in 2 settings from dvc" in out.err


def test_plot_of_a_string_param():
    table = pd.DataFrame({"experiment": ["a", "b", "c"], "id": ["1", "2", "3"],
                          "model.netG": ["unet_128", "resnet_6blocks", "unet_128"], "fid_A2B": [3.0, 2.0, 4.0]})
    png = plot_png(Comparison(table, "model.netG", ["fid_A2B"]))
    assert png.startswith(b"\x89PNG")


@pytest.fixture
def mlflow_store(project):
    """Three finished runs as train + evaluate log them, one failed run, one still running."""
    ids = {}
    for lam, fid in ((1.0, 80.0), (0.0, 95.5), (0.5, 88.25)):
        cfg = config_from_dict({"lambda_identity": lam})
        with tracking.start_training_run(cfg) as mlflow:
            mlflow.log_metrics({"fid_A2B": fid, "kid_A2B": fid / 1000, "fid_B2A": fid + 1, "kid_B2A": 0.01})
            ids[lam] = mlflow.active_run().info.run_id
    import mlflow

    with mlflow.start_run(run_name="crashed"):
        mlflow.log_metric("fid_A2B", 1.0)
        mlflow.end_run("FAILED")
    running = mlflow.start_run(run_name="in-progress")
    mlflow.log_metric("fid_A2B", 2.0)
    yield ids, running.info.run_id
    mlflow.end_run()


def test_load_mlflow(mlflow_store):
    ids, running = mlflow_store
    df = load_mlflow()
    assert sorted(df["id"]) == sorted(i[:8] for i in ids.values())
    # Params come back typed, as params.yaml has them; identity_weight_effective is train's param.
    row = df.set_index("id").loc[ids[0.5][:8]]
    assert row["lambda_identity"] == 0.5 and row["model.ngf"] == 64 and row["identity_weight_effective"] == 5.0
    assert row["fid_A2B"] == 88.25

    comparison = select(df)
    assert list(comparison.table["lambda_identity"]) == [0.0, 0.5, 1.0]
    assert list(comparison.table["fid_A2B"]) == [95.5, 88.25, 80.0]
    assert "identity_weight_effective" in comparison.table.columns

    with_running = load_mlflow(include=[running])
    assert running[:8] in set(with_running["id"]) and len(with_running) == 4


def test_main_from_mlflow(mlflow_store, project, capsys):
    compare.main(None, Namespace(param="lambda_identity", metrics=None, source="mlflow"))
    table = pd.read_csv(project / "reports/compare.csv")
    assert list(table["fid_A2B"]) == [95.5, 88.25, 80.0]
    assert "3 experiments in 3 settings from mlflow" in capsys.readouterr().err


def test_missing_mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(UserError, match="no MLflow store"):
        load_mlflow()
    assert not (tmp_path / "none.db").exists()


def test_markdown_escapes_pipes_and_formats_floats():
    table = pd.DataFrame({"experiment": ["a|b"], "fid": [1.23456789], "missing": [float("nan")]})
    assert to_markdown(table).splitlines()[2] == "| a\\|b | 1.23457 |  |"


# --- over seeds ------------------------------------------------------------------------------

# fid_A2B of a lambda_identity x seed grid, and one setting with a single seed.
GRID = {(0.0, 0): 100.0, (0.0, 1): 104.0, (0.0, 2): 108.0,
        (0.5, 0): 90.0, (0.5, 1): 91.0, (0.5, 2): 92.0,
        (1.0, 0): 101.0, (1.0, 1): 103.0, (1.0, 2): 111.0,
        (2.0, 0): 120.0}
# Mean, sample std and 95% interval of the mean per setting, and the Welch 95% interval of each
# difference, from scipy.stats (ttest_1samp / ttest_ind(equal_var=False).confidence_interval()).
EXPECTED_SETTINGS = {0.0: (104.0, 4.0, 94.06344915299869, 113.93655084700131),
                     0.5: (91.0, 1.0, 88.51586228824966, 93.48413771175034),
                     1.0: (105.0, 5.291502622129181, 91.85517878454314, 118.14482121545686)}
EXPECTED_DIFFERENCES = {(0.0, 0.5): (-13.0, -22.228764590212663, -3.771235409787339, True),
                        (0.0, 1.0): (1.0, -9.95226546001295, 11.95226546001295, False),
                        (0.5, 1.0): (14.0, 1.440896149886962, 26.55910385011304, True)}


@pytest.fixture
def seed_grid(project):
    """GRID as train + evaluate log it; kid_A2B missing from one run."""
    for (lam, seed), fid in GRID.items():
        with tracking.start_training_run(config_from_dict({"lambda_identity": lam, "seed": seed})) as mlflow:
            mlflow.log_metrics({"fid_A2B": fid, **({} if (lam, seed) == (1.0, 2) else {"kid_A2B": fid / 1000})})
    return select(load_mlflow())


def test_settings_over_seeds_have_n_mean_std_and_interval(seed_grid):
    assert seed_grid.metrics == ["fid_A2B", "kid_A2B"]
    # The seed and identity_weight_effective (lambda_cycle * lambda_identity) vary but define no setting.
    assert {"seed", "identity_weight_effective"} <= set(seed_grid.table.columns)
    assert setting_columns(seed_grid) == ["lambda_identity"]
    summary = summarize(seed_grid).set_index("lambda_identity")
    assert list(summary.index) == [0.0, 0.5, 1.0, 2.0]
    assert list(summary["n"]) == [3, 3, 3, 1] and summary.loc[0.5, "seeds"] == "0 1 2"
    for lam, expected in EXPECTED_SETTINGS.items():
        row = summary.loc[lam]
        assert row["fid_A2B_n"] == 3
        assert tuple(row[f"fid_A2B_{k}"] for k in ("mean", "std", "ci_low", "ci_high")) == pytest.approx(expected, rel=1e-9)
    single = summary.loc[2.0]
    assert single["fid_A2B_mean"] == 120.0 and math.isnan(single["fid_A2B_std"]) and math.isnan(single["fid_A2B_ci_low"])
    # A metric one run lacks: n counts the runs that have it.
    assert summary.loc[1.0, "kid_A2B_n"] == 2 and summary.loc[1.0, "kid_A2B_mean"] == pytest.approx(0.102)


def test_differences_say_which_exceed_the_seed_spread(seed_grid):
    diffs = differences(seed_grid)
    fid = diffs[diffs["metric"] == "fid_A2B"]
    # Every pair of the 4 settings, the later in the table's order minus the earlier.
    assert len(fid) == 6 and len(diffs) == 12
    by_pair = {(r.baseline, r.setting): r for r in fid.itertuples()}
    for (a, b), (diff, low, high, exceeds) in EXPECTED_DIFFERENCES.items():
        row = by_pair[(f"lambda_identity={a:g}", f"lambda_identity={b:g}")]
        assert (row.difference, row.ci_low, row.ci_high) == pytest.approx((diff, low, high), rel=1e-9)
        assert row.exceeds_spread is exceeds and (row.n, row.n_baseline) == (3, 3)
    # Against a single run there is no spread to judge by.
    for a in (0.0, 0.5, 1.0):
        row = by_pair[(f"lambda_identity={a:g}", "lambda_identity=2")]
        assert row.exceeds_spread is None and math.isnan(row.ci_low) and row.n == 1
        assert row.difference == pytest.approx(120.0 - EXPECTED_SETTINGS[a][0])


def test_plot_draws_each_setting_s_interval(seed_grid):
    fig = plot_figure(Comparison(seed_grid.table, "lambda_identity", ["fid_A2B"]))
    ax = fig.axes[0]
    (bars,) = ax.containers
    # Each bar: x at the setting, from the interval's low end to its high end (a single run: none).
    segments = np.array(sorted((s[0][0], s[0][1], s[1][0], s[1][1]) for s in bars[2][0].get_segments()))
    expected = sorted([(lam, low, lam, high) for lam, (_, _, low, high) in EXPECTED_SETTINGS.items()]
                      + [(2.0, 120.0, 2.0, 120.0)])
    np.testing.assert_allclose(segments, np.array(expected), rtol=1e-9)
    assert len(ax.collections[0].get_offsets()) == len(GRID)  # every run, as a point
    assert "95% interval" in ax.get_title()
    assert plot_png(seed_grid).startswith(b"\x89PNG")


def test_main_over_seeds_writes_settings_and_differences(seed_grid, project, capsys):
    compare.main(None, Namespace(param="lambda_identity", metrics=["fid_A2B"], source="mlflow"))
    settings = pd.read_csv(project / "reports/compare_settings.csv")
    assert list(settings["n"]) == [3, 3, 3, 1]
    assert list(settings["fid_A2B_mean"]) == [104.0, 91.0, 105.0, 120.0]
    diffs = pd.read_csv(project / "reports/compare_differences.csv")
    assert [str(v) for v in diffs["exceeds_spread"]] == ["True", "False", "nan", "True", "nan", "nan"]
    md = (project / "reports/compare.md").read_text()
    assert "| 0 | 3 | 0 1 2 | 104 ± 4 [94.06, 113.9] |" in md
    assert "| fid_A2B | lambda_identity=0.5 | lambda_identity=0 | -13 | [-22.23, -3.771] | yes |" in md
    assert "| fid_A2B | lambda_identity=1 | lambda_identity=0 | 1 | [-9.952, 11.95] | no |" in md
    out = capsys.readouterr()
    assert "104 ± 4 [94.06, 113.9]" in out.out and "10 experiments in 4 settings from mlflow" in out.err


# The README's sweep, small: a stand-in for train + evaluate that logs to MLflow through
# cyclegan.tracking, as the pipeline's stages do, inside `dvc exp run --queue`.
SWEEP_STAGE = """\
import json, os, yaml
from cyclegan import tracking
from cyclegan.config import config_from_dict
p = yaml.safe_load(open("params.yaml"))
fid = {(0.0, 0): 100.0, (0.0, 1): 104.0, (1.0, 0): 90.0, (1.0, 1): 91.0}[(float(p["lambda_identity"]), p["seed"])]
os.makedirs("metrics", exist_ok=True)
json.dump({"fid_A2B": fid}, open("metrics/eval.json", "w"))
with tracking.start_training_run(config_from_dict(p)) as mlflow:
    mlflow.log_metrics({"fid_A2B": fid})
"""


def _exp_states(repo: Path) -> dict[str, tuple[str, str]]:
    """Experiment name -> (state, commit)."""
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo))
    return {exp["name"]: (((exp.get("executor") or {}).get("state")) or "success", exp["revs"][0]["rev"])
            for entry in shown for exp in entry.get("experiments") or []}


@pytest.mark.slow
def test_queued_seed_sweep_groups_by_setting_and_links_dvc_commits(tmp_path, monkeypatch):
    from helpers import mlflow_client, wait_for_experiments

    repo = tmp_path / "sweep"
    repo.mkdir()
    (repo / "stage.py").write_text(SWEEP_STAGE)
    (repo / "params.yaml").write_text(yaml.safe_dump({"lambda_cycle": 10.0, "lambda_identity": 0.5, "seed": 0}))
    (repo / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    (repo / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          evaluate:
            cmd: {sys.executable} stage.py
            deps: [stage.py]
            params: [lambda_identity, seed]
            metrics:
              - metrics/eval.json:
                  cache: false
        """))
    # The default store, at the root of the repo the queue belongs to (tracking.tracking_uri).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _run(["git", "init", "-q"], repo)
    dvc("init", "-q", cwd=repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "baseline"], repo)
    baseline = _run(["git", "rev-parse", "HEAD"], repo).strip()
    dvc("exp", "run", "--queue", "-S", "lambda_identity=0,1", "-S", "seed=0,1", cwd=repo)
    try:
        dvc("queue", "start", "-j", "2", cwd=repo)
        wait_for_experiments(repo, dvc_env(), 4, 300, "the queued seed sweep")
        states = _exp_states(repo)
    finally:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "stop", "--kill"], cwd=repo,
                       env=dvc_env(), capture_output=True, timeout=120)
    assert len(states) == 4 and {s for s, _ in states.values()} == {"success"}, states

    client = mlflow_client(repo)
    experiment_id = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    runs = client.search_runs([experiment_id])
    assert sorted(r.data.tags["dvc_exp_name"] for r in runs) == sorted(states)
    assert {r.data.tags["dvc_exp_baseline_rev"] for r in runs} == {baseline}
    assert not any(tracking.EXP_COMMIT_TAG in r.data.tags for r in runs)  # DVC commits after the stages

    for source in ("mlflow", "dvc"):
        out = run(["cyclegan", "compare", "--source", source, "--metric", "fid_A2B"], repo, dvc_env(), timeout=300)
        settings = pd.read_csv(repo / "reports/compare_settings.csv")
        assert list(settings["lambda_identity"]) == [0.0, 1.0] and list(settings["n"]) == [2, 2], source
        assert list(settings["fid_A2B_mean"]) == [102.0, 90.5] and list(settings["seeds"]) == ["0 1", "0 1"], source
        assert "4 experiments in 2 settings from " + source in out.stderr
        # The first compare tags each run with its experiment's commit; the second has nothing to add.
        assert ("4 MLflow runs tagged with their dvc exp commit" in out.stderr) == (source == "mlflow")
    for r in client.search_runs([experiment_id]):
        assert r.data.tags[tracking.EXP_COMMIT_TAG] == states[r.data.tags["dvc_exp_name"]][1]
