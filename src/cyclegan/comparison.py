"""Experiments side by side, and their FID/KID against one param (`cyclegan compare`, the report).

Two sources hold the same experiments seen from two sides:
  dvc     `dvc exp show --json`: the workspace, the baseline commit and every finished
          `dvc exp run`, with params.yaml and the metrics files (metrics/*.json)
  mlflow  the runs of the "cyclegan" MLflow experiment (tracking.tracking_uri()): params as
          logged by train (flattened, plus identity_weight_effective) and each metric's last value
Either way the result is one pandas row per experiment, the columns named as in params.yaml
(`lambda_identity`, `train.lr`) and as in metrics/eval.json (`fid_A2B`). The chosen param, the
other params that differ between experiments and the chosen metrics go to reports/compare.csv,
reports/compare.md and reports/compare.png (each metric against the param).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from . import paths, tracking
from .config import Config, flatten
from .errors import UserError
from .figures import figure_png, pyplot
from .fileio import atomic_path, write_text

DEFAULT_PARAM = "lambda_identity"
DEFAULT_METRICS = ("fid_A2B", "kid_A2B", "fid_B2A", "kid_B2A")
SOURCES = ("dvc", "mlflow")
ID_COLUMNS = ("experiment", "id")
OUTPUTS = ("compare.csv", "compare.md", "compare.png")  # written to reports/


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
    """The columns of `df` that are pipeline params (params.yaml keys, identity_weight_effective)."""
    names = set(flatten(Config().to_dict())) | {"identity_weight_effective"}
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
    table = table.sort_values([param, "experiment"], key=_sort_key, kind="stable").reset_index(drop=True)
    return Comparison(table, param, metrics)


def _sort_key(column: pd.Series) -> pd.Series:
    # Numbers in numeric order, anything else (strings, mixed) by its text.
    numeric = pd.to_numeric(column, errors="coerce")
    return numeric if numeric.notna().all() else column.astype(str)


def compare(source: str, param: str = DEFAULT_PARAM, metrics: Iterable[str] | None = None) -> Comparison:
    return select(load(source), param, metrics)


# --- writing --------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value).replace("|", "\\|")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' own needs the optional `tabulate`)."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot_png(comparison: Comparison) -> bytes:
    """One panel per metric against the param, each point labelled with its experiment; PNG bytes."""
    plt = pyplot()
    table, param, metrics = comparison.table, comparison.param, comparison.metrics
    x = pd.to_numeric(table[param], errors="coerce")
    labels = None
    if x.isna().any():  # strings (netG, gan_mode): evenly spaced, in the table's order
        labels = list(dict.fromkeys(table[param].astype(str)))
        x = table[param].astype(str).map({v: i for i, v in enumerate(labels)})
    cols = min(len(metrics), 2)
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        y = pd.to_numeric(table[metric], errors="coerce")
        ok = y.notna()
        ax.scatter(x[ok], y[ok], zorder=3)
        # Repeated param values (several seeds) are joined through their mean.
        means = y[ok].groupby(x[ok]).mean().sort_index()
        ax.plot(means.index, means.values, color="tab:gray", lw=1, zorder=2)
        for xi, yi, name in zip(x[ok], y[ok], table["experiment"][ok]):
            ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(xlabel=param, ylabel=metric, title=f"{metric} vs {param}")
        ax.grid(alpha=0.3)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.tight_layout()
    return figure_png(fig)


def write_outputs(comparison: Comparison, out_dir: Path = paths.REPORTS) -> list[Path]:
    csv, md, png = (out_dir / name for name in OUTPUTS)
    with atomic_path(csv) as tmp:
        comparison.table.to_csv(tmp, index=False)
    write_text(md, to_markdown(comparison.table))
    with atomic_path(png) as tmp:
        tmp.write_bytes(plot_png(comparison))
    return [csv, md, png]
