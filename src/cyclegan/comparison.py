"""Experiments side by side, and their FID/KID against one param (`cyclegan compare`, the report).

Two sources hold the same experiments seen from two sides:
  dvc     `dvc exp show --json`: the workspace, the baseline commit and every finished
          `dvc exp run`, with params.yaml and the metrics files (metrics/*.json)
  mlflow  the runs of the "cyclegan" MLflow experiment (tracking.tracking_uri()): params as
          logged by train (flattened, plus identity_weight_effective) and each metric's last value
Either way the result is one pandas row per experiment, the columns named as in params.yaml
(`lambda_identity`, `train.lr`) and as in metrics/eval.json (`fid_A2B`). The chosen param, the
other params that differ between experiments and the chosen metrics go to reports/compare.csv.

GAN metrics move by several FID points between seeds, so one run per setting proves little.
Runs that differ only in `seed` are one setting: per setting and metric, n, mean, standard
deviation and the 95% interval of the mean (Student's t) go to reports/compare_settings.csv; for
each pair of settings, the difference of the means with its 95% interval (Welch) goes to
reports/compare_differences.csv, and it "exceeds the seed spread" when that interval excludes 0
(Welch's t-test at 5%). reports/compare.md holds all three tables, and reports/compare.png each
metric against the param: the runs, and each setting's mean with its interval as error bars.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from . import paths, tracking
from .config import Config, flatten
from .errors import UserError
from .figures import figure_png, pyplot
from .fileio import atomic_path, write_text

DEFAULT_PARAM = "lambda_identity"
# clean-FID comes from MLflow (--source mlflow; it is not in eval.json); absent defaults are dropped.
DEFAULT_METRICS = ("fid_A2B", "kid_A2B", "fid_B2A", "kid_B2A",
                   *(f"cleanfid_{d}" for d in ("A2B", "B2A")))
SOURCES = ("dvc", "mlflow")
ID_COLUMNS = ("experiment", "id")
OUTPUTS = ("compare.csv", "compare_settings.csv", "compare_differences.csv", "compare.md", "compare.png")  # in reports/
SEED = "seed"  # runs that differ only in this param are repeats of one setting
DERIVED = ("identity_weight_effective",)  # a function of other params: never tells settings apart
CONFIDENCE = 0.95


# --- reading --------------------------------------------------------------------------------

def _numeric(value: Any) -> Any:
    """'0.5' -> 0.5, '3' -> 3: MLflow stores params as strings."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _dvc_row(rev: dict[str, Any]) -> dict[str, Any] | None:
    """One `dvc exp show --json` revision -> a flat row; None when it has no usable data."""
    data = rev.get("data")
    if rev.get("error") or not data:
        return None
    row: dict[str, Any] = {}
    for file, content in (data.get("params") or {}).items():
        # params.yaml keys stay bare, as `dvc exp run -S` names them; other files get a prefix.
        prefix = "" if file == "params.yaml" else f"{file}:"
        row.update({f"{prefix}{k}": v for k, v in flatten(content.get("data") or {}).items()})
    for file, content in (data.get("metrics") or {}).items():
        for key, value in flatten(content.get("data") or {}).items():
            # A metric never hides a param of the same name; DVC's own table writes file:key too.
            row[f"{file}:{key}" if key in row else key] = value
    return row


def parse_dvc_exp_show(entries: list[dict[str, Any]]) -> pd.DataFrame:
    """The JSON of `dvc exp show --json` (DVC 3.x) as one row per experiment.

    Its top level lists the workspace and each baseline commit; a commit's "experiments" list
    holds one entry per experiment, whose "revs" start with the experiment's tip. Queued,
    running and failed experiments have no metrics yet, or an error, and are left out.
    """
    rows: list[dict[str, Any]] = []
    for entry in entries:
        candidates = [entry]
        for exp in entry.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            if state in (None, "success") and exp.get("revs"):
                candidates.append({**exp["revs"][0], "name": exp.get("name") or exp["revs"][0].get("name")})
        for rev in candidates:
            row = _dvc_row(rev)
            if row is None:
                continue
            sha = str(rev.get("rev") or "")
            short = sha[:7] if re.fullmatch(r"[0-9a-f]{40}", sha) else sha  # "workspace" stays whole
            rows.append({"experiment": rev.get("name") or short, "id": short, **row})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # The workspace usually repeats the experiment or commit it was last run or applied as.
    values = df.drop(columns=list(ID_COLUMNS)).astype(str)
    duplicate = values.duplicated(keep=False) & (df["experiment"] == "workspace")
    return df[~duplicate].reset_index(drop=True)


def load_dvc(repo: str | Path = ".") -> pd.DataFrame:
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", "--hide-queued", "--hide-failed"]
    try:
        out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"`dvc exp show` could not run ({e}); try --source mlflow") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"`dvc exp show --json` failed in {Path(repo).resolve()}: {last}")
    try:
        return parse_dvc_exp_show(json.loads(out.stdout))
    except ValueError:
        raise UserError("`dvc exp show --json` printed no JSON; is this DVC 3.x?") from None


def load_mlflow(tracking_uri: str | None = None, experiment: str = tracking.EXPERIMENT,
                include: Iterable[str] = ()) -> pd.DataFrame:
    """The runs of `experiment` that finished, and those in `include` (run ids) whatever their
    status, one row each with params and each metric's latest value (MLflow's: highest step)."""
    from mlflow import MlflowClient  # seconds to import; only this source needs it

    uri = tracking_uri or tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        # Searching would create an empty store as a side effect.
        raise UserError(f"{uri.removeprefix('sqlite:///')}: no MLflow store; run `dvc repro` or `dvc exp run` first")
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return pd.DataFrame()
    include = set(include)
    rows, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"],
                                  max_results=1000, page_token=token)
        for run in page:
            if run.info.status != "FINISHED" and run.info.run_id not in include:
                continue
            params = {k: _numeric(v) for k, v in run.data.params.items()}
            name = run.data.tags.get("dvc_exp_name") or run.info.run_name or ""
            rows.append({"experiment": name, "id": run.info.run_id[:8], **params,
                         **{f"metrics:{k}" if k in params else k: v for k, v in run.data.metrics.items()}})
        token = page.token
        if not token:
            return pd.DataFrame(rows)


def load(source: str) -> pd.DataFrame:
    if source == "dvc":
        return load_dvc()
    if source == "mlflow":
        return load_mlflow()
    raise UserError(f"--source {source}: choose one of {', '.join(SOURCES)}")


# --- selecting ------------------------------------------------------------------------------

@dataclass
class Comparison:
    """One row per experiment: ID_COLUMNS, `param`, the other params that vary, then `metrics`."""

    table: pd.DataFrame
    param: str
    metrics: list[str]


def known_params(df: pd.DataFrame) -> list[str]:
    """The columns of `df` that are pipeline params (params.yaml keys, identity_weight_effective)
    that can change a result: not `tracking.*`, which only says where a run is recorded."""
    names = {k for k in flatten(Config().to_dict()) if not k.startswith("tracking.")} | {"identity_weight_effective"}
    return [c for c in df.columns if c in names]


def select(df: pd.DataFrame, param: str = DEFAULT_PARAM, metrics: Iterable[str] | None = None) -> Comparison:
    """The comparison of the experiments in `df` (from `load_dvc` or `load_mlflow`).

    Explicitly asked-for metrics must exist; of the defaults, those no experiment has are dropped
    (a store where only A2B was evaluated, say). Experiments with none of the metrics are dropped.
    """
    if df.empty:
        raise UserError("no finished experiments with metrics; run `dvc repro` or `dvc exp run` first")
    known = ", ".join(sorted(c for c in df.columns if c not in ID_COLUMNS))
    if param not in df.columns:
        raise UserError(f"--param {param}: no experiment has it; known columns: {known}")
    if metrics:
        metrics = list(metrics)
        missing = [m for m in metrics if m not in df.columns]
        if missing:
            raise UserError(f"--metric {missing[0]}: no experiment has it; known columns: {known}")
    else:
        metrics = [m for m in DEFAULT_METRICS if m in df.columns]
        if not metrics:
            raise UserError(f"none of {', '.join(DEFAULT_METRICS)} in any experiment; run `dvc repro` "
                            f"(or `dvc exp run`) first, or pass --metric")
    df = df[df[metrics].notna().any(axis=1)]
    if df.empty:
        raise UserError(f"no experiment has a value for {', '.join(metrics)}; run `dvc repro` first")
    # The other params that differ between these experiments: what else could explain a metric.
    others = [c for c in known_params(df)
              if c not in (param, *metrics) and df[c].astype(str).nunique(dropna=False) > 1]
    table = df[[*ID_COLUMNS, param, *others, *metrics]]
    order = [param, *([SEED] if SEED in others else []), "experiment"]  # a setting's runs by seed
    table = table.sort_values(order, key=_sort_key, kind="stable").reset_index(drop=True)
    return Comparison(table, param, metrics)


def _sort_key(column: pd.Series) -> pd.Series:
    # Numbers in numeric order, anything else (strings, mixed) by its text.
    numeric = pd.to_numeric(column, errors="coerce")
    return numeric if numeric.notna().all() else column.astype(str)


def compare(source: str, param: str = DEFAULT_PARAM, metrics: Iterable[str] | None = None) -> Comparison:
    return select(load(source), param, metrics)


# --- over seeds -----------------------------------------------------------------------------

def setting_columns(comparison: Comparison) -> list[str]:
    """What defines a setting: the param and every other pipeline param in the table, but the seed."""
    skip = {comparison.param, *comparison.metrics, SEED, *DERIVED}
    return [comparison.param, *(c for c in known_params(comparison.table) if c not in skip)]


def _t_quantile(df: float) -> float:
    from scipy.special import stdtrit  # Student's t quantile; scipy.stats would import for a second

    return float(stdtrit(df, 0.5 + CONFIDENCE / 2))


def mean_interval(values: Iterable[float]) -> dict[str, float]:
    """n, mean, sample standard deviation and the 95% interval of the mean (Student's t) of the
    finite values; std and interval are NaN for fewer than 2 values."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    half = _t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def _settings(comparison: Comparison) -> list[tuple[tuple, pd.DataFrame]]:
    """(key, runs) per setting, in the table's order (sorted by the param)."""
    keys = setting_columns(comparison)
    table = comparison.table
    # Grouped by the text of each key: NaN and mixed types group as they print.
    labels = table[keys].astype(str).apply(tuple, axis=1)
    order = list(dict.fromkeys(labels))
    return [(tuple(table.loc[labels == key, keys].iloc[0]), table[labels == key]) for key in order]


def setting_label(comparison: Comparison, key: tuple) -> str:
    return ", ".join(f"{c}={_cell(v)}" for c, v in zip(setting_columns(comparison), key))


def summarize(comparison: Comparison) -> pd.DataFrame:
    """One row per setting: its params, the runs (n, seeds), and per metric n, mean, std and the
    95% interval of the mean (`<metric>_n`, `_mean`, `_std`, `_ci_low`, `_ci_high`)."""
    rows = []
    for key, runs in _settings(comparison):
        row: dict[str, Any] = dict(zip(setting_columns(comparison), key))
        row["n"] = len(runs)
        row["seeds"] = " ".join(map(_cell, runs[SEED])) if SEED in runs else ""
        for metric in comparison.metrics:
            stats = mean_interval(pd.to_numeric(runs[metric], errors="coerce"))
            row.update({f"{metric}_{k}": v for k, v in stats.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def welch_interval(a: dict[str, float], b: dict[str, float]) -> tuple[float, float, float]:
    """The difference of means b - a and its 95% interval (Welch), from two `mean_interval`s;
    the interval is NaN where either side has fewer than 2 values."""
    diff = b["mean"] - a["mean"]
    if a["n"] < 2 or b["n"] < 2:
        return diff, math.nan, math.nan
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    se = math.sqrt(va + vb)
    if se == 0:  # every seed gave the same value on both sides: no spread to exceed
        return diff, diff, diff
    df = (va + vb) ** 2 / (va ** 2 / (a["n"] - 1) + vb ** 2 / (b["n"] - 1))
    half = _t_quantile(df) * se
    return diff, diff - half, diff + half


def differences(comparison: Comparison) -> pd.DataFrame:
    """Per metric and pair of settings: the difference of the means (second minus first, in the
    table's order), its 95% interval, and whether it exceeds the seed spread (the interval
    excludes 0; None where a setting has fewer than 2 runs)."""
    settings = _settings(comparison)
    rows = []
    for metric in comparison.metrics:
        stats = [(key, mean_interval(pd.to_numeric(runs[metric], errors="coerce"))) for key, runs in settings]
        for (key_a, a), (key_b, b) in itertools.combinations(stats, 2):
            diff, low, high = welch_interval(a, b)
            exceeds = None if math.isnan(low) else bool(low > 0 or high < 0)
            rows.append({"metric": metric, "setting": setting_label(comparison, key_b),
                         "baseline": setting_label(comparison, key_a), "n": b["n"], "n_baseline": a["n"],
                         "difference": diff, "ci_low": low, "ci_high": high, "exceeds_spread": exceeds})
    return pd.DataFrame(rows, columns=["metric", "setting", "baseline", "n", "n_baseline", "difference",
                                       "ci_low", "ci_high", "exceeds_spread"])


# --- writing --------------------------------------------------------------------------------

def _text(value: Any, digits: int = 6) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _cell(value: Any) -> str:
    return _text(value).replace("|", "\\|")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' own needs the optional `tabulate`)."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _mean_cell(row: pd.Series, metric: str, n: int) -> str:
    """mean ± std [95% interval], 4 significant digits; the metric's n where some runs lack it."""
    mean, std, low, high, k = (row[f"{metric}_{x}"] for x in ("mean", "std", "ci_low", "ci_high", "n"))
    text = _text(mean, 4) if math.isnan(std) else f"{_text(mean, 4)} ± {_text(std, 3)} [{_text(low, 4)}, {_text(high, 4)}]"
    return text + (f" (n={k})" if k != n else "")


def settings_table(comparison: Comparison, summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as the Markdown and the terminal show it: a cell per metric."""
    keys = setting_columns(comparison)
    out = summary[[*keys, "n", "seeds"]].copy()
    for metric in comparison.metrics:
        out[metric] = [_mean_cell(row, metric, row["n"]) for _, row in summary.iterrows()]
    return out


def differences_table(diffs: pd.DataFrame) -> pd.DataFrame:
    verdict = {True: "yes", False: "no", None: "n/a"}
    return pd.DataFrame({
        "metric": diffs["metric"], "setting": diffs["setting"], "minus": diffs["baseline"],
        "difference": [_text(v, 4) for v in diffs["difference"]],
        "95% interval": ["" if math.isnan(lo) else f"[{_text(lo, 4)}, {_text(hi, 4)}]"
                         for lo, hi in zip(diffs["ci_low"], diffs["ci_high"])],
        "exceeds the seed spread": [verdict[v] for v in diffs["exceeds_spread"]],
    })


def report_markdown(comparison: Comparison, summary: pd.DataFrame, diffs: pd.DataFrame) -> str:
    """compare.md: the settings over seeds, their differences, and the runs."""
    parts = [f"# {comparison.param}: {len(comparison.table)} runs, {len(summary)} settings\n",
             f"Per setting (runs that differ only in `{SEED}`): n runs, and per metric the mean ± standard "
             "deviation [95% interval of the mean].\n", to_markdown(settings_table(comparison, summary)),
             "## Differences\n",
             "Setting minus the other, with the 95% interval of the difference (Welch). A difference "
             "exceeds the seed spread when its interval excludes 0; n/a: a setting with fewer than 2 "
             f"runs (add seeds: `-S {SEED}=0,1,2`).\n"]
    parts.append(to_markdown(differences_table(diffs)) if len(diffs) else "One setting: nothing to compare.\n")
    parts += ["## Runs\n", to_markdown(comparison.table)]
    return "\n".join(parts)


def plot_png(comparison: Comparison) -> bytes:
    return figure_png(plot_figure(comparison))


def plot_figure(comparison: Comparison):
    """One panel per metric against the param: each run, and each setting's mean with its 95%
    interval as error bars (a line per combination of the other varying params)."""
    plt = pyplot()
    table, param, metrics = comparison.table, comparison.param, comparison.metrics
    summary = summarize(comparison)
    position = pd.to_numeric(table[param], errors="coerce")
    labels = None
    if position.isna().any():  # strings (netG, gan_mode): evenly spaced, in the table's order
        labels = list(dict.fromkeys(table[param].astype(str)))
        index = {v: i for i, v in enumerate(labels)}
        x_runs = table[param].astype(str).map(index)
        x_settings = summary[param].astype(str).map(index)
    else:
        x_runs, x_settings = position, pd.to_numeric(summary[param])
    others = [c for c in setting_columns(comparison) if c != param]
    series = summary[others].astype(str).apply(tuple, axis=1) if others else pd.Series([()] * len(summary))
    repeated = bool((summary["n"] > 1).any())
    cols = min(len(metrics), 2)
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        y = pd.to_numeric(table[metric], errors="coerce")
        ok = y.notna()
        ax.scatter(x_runs[ok], y[ok], s=14, color="tab:gray", alpha=0.6 if repeated else 1.0, zorder=3,
                   label="runs" if repeated else None)
        if not repeated:  # one run per setting: name each
            for xi, yi, name in zip(x_runs[ok], y[ok], table["experiment"][ok]):
                ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for key in dict.fromkeys(series):
            part = (series == key).to_numpy()
            mean = summary.loc[part, f"{metric}_mean"].to_numpy(dtype=float)
            below = np.nan_to_num(mean - summary.loc[part, f"{metric}_ci_low"].to_numpy(dtype=float))
            above = np.nan_to_num(summary.loc[part, f"{metric}_ci_high"].to_numpy(dtype=float) - mean)
            name = ", ".join(f"{c}={v}" for c, v in zip(others, key)) or ("mean, 95% interval" if repeated else None)
            order = np.argsort(x_settings[part].to_numpy(dtype=float))
            ax.errorbar(x_settings[part].to_numpy(dtype=float)[order], mean[order],
                        yerr=[below[order], above[order]] if repeated else None,
                        marker="o" if repeated else None, capsize=4, lw=1, zorder=2, label=name)
        title = f"{metric} vs {param}" + (" (mean, 95% interval over seeds)" if repeated else "")
        ax.set(xlabel=param, ylabel=metric, title=title)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels)
        if repeated or others:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def write_outputs(comparison: Comparison, out_dir: Path = paths.REPORTS) -> list[Path]:
    runs_csv, settings_csv, diffs_csv, md, png = (out_dir / name for name in OUTPUTS)
    summary, diffs = summarize(comparison), differences(comparison)
    for path, frame in ((runs_csv, comparison.table), (settings_csv, summary), (diffs_csv, diffs)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    write_text(md, report_markdown(comparison, summary, diffs))
    with atomic_path(png) as tmp:
        tmp.write_bytes(plot_png(comparison))
    return [runs_csv, settings_csv, diffs_csv, md, png]
