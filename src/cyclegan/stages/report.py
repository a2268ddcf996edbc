"""`cyclegan report`: reports/index.html, one page that says what this run did and how well.

The page is self-contained (every image is a base64 data URI, the style is inline, there is no
script), so it opens offline, from an MLflow artifact or a mail attachment alike. Sections:
  dataset        reports/dataset_preview.png and the counts of metrics/data_report.json (prepare)
  training       loss curves drawn from metrics/train_losses.csv
  FID/KID        per epoch, from metrics/train_eval.csv (train.eval_every)
  samples        the first eval.n_samples test images both ways, rows input / translation /
                 reconstruction / identity, computed here with models/G_A.safetensors and G_B
  metrics        metrics/eval_details.json (every figure, and the protocol), and metrics/train.json;
                 clean-FID, precision/recall and the published horse2zebra figures beside ours
reports/index.html is a DVC output, so it is built from the stages' files alone: the same data,
params and code give the same bytes. The copy logged to the MLflow run adds what only the store
knows: the run's id and name, and this run beside the other finished runs of the store
(`cyclegan compare`). The PNGs are also written to reports/ and logged as artifacts of the run.
"""
from __future__ import annotations

import base64
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable

import numpy as np
import pandas as pd

from .. import literature_metrics, paths, tracking
from ..comparison import Comparison, load_mlflow, plot_png, select
from ..config import Config
from ..prepared_data import PreparedDataset
from ..device import exact_fp32, resolve_device
from ..errors import UserError
from ..figures import SAMPLE_ROWS, figure_png, png_bytes, pyplot, sample_grid
from ..fileio import atomic_path, write_text
from ..generator_file import load_generator
from ..vocabulary import (A2B, CLEANFID, DIRECTIONS, FID, KID, KID_STD, LITERATURE, PER_EPOCH, PRECISION,
                          RECALL, SCORED, TEST_SPLITS, direction_named, during_training, metric)

REPORT = paths.REPORTS / "index.html"
LOSS_PNG = paths.REPORTS / "loss_curves.png"
EPOCH_PNG = paths.REPORTS / "fid_kid_per_epoch.png"
SAMPLE_PNG = {d.name: paths.REPORTS / f"samples_{d.name}.png" for d in DIRECTIONS}
ARTIFACT_DIR = "report"
# What train scores every train.eval_every epochs (metrics/train_eval.csv; in MLflow with step = epoch).
EPOCH_METRICS = tuple(during_training(name) for name in PER_EPOCH)
# Loss terms by what they measure; the CSV names them loss_<term>.
LOSS_PANELS = {"adversarial": ("G_A", "G_B", "D_A", "D_B"),
               "reconstruction": ("cycle_A", "cycle_B", "idt_A", "idt_B")}
# Image grids are shown at this many screen pixels per image pixel, at most MAX_ZOOMED_WIDTH wide.
ZOOM, MAX_ZOOMED_WIDTH = 3, 960


def _require(files: dict[Path, str]) -> None:
    """Each file -> the stage that writes it; the first missing one stops the report."""
    for f, stage in files.items():
        if not f.is_file():
            raise UserError(f"{f}: missing; run `dvc repro` (or `dvc repro {stage}`) first")


def _read_json(path: Path, stage: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path}: not valid JSON; run `dvc repro {stage}` again") from None


# --- figures ------------------------------------------------------------------------------

def loss_curves_png(losses: pd.DataFrame) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, (title, terms) in zip(axes, LOSS_PANELS.items()):
        for term in terms:
            if f"loss_{term}" in losses:
                ax.plot(losses["step"], losses[f"loss_{term}"], label=term, lw=1.2)
        ax.set(title=f"{title} losses", xlabel="step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[2].plot(losses["step"], losses["lr"], color="tab:gray")
    axes[2].set(title="learning rate", xlabel="step")
    axes[2].ticklabel_format(axis="y", useOffset=False)
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


def epoch_metrics_png(history: dict[str, list[tuple[int, float]]]) -> bytes:
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, kind in zip(axes, (FID, KID)):
        for name, points in history.items():
            if name.startswith(f"train_{kind}_"):
                epochs, values = zip(*points)
                ax.plot(epochs, values, marker="o", label=name.removeprefix(f"train_{kind}_"))
        ax.set(title=kind.upper(), xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


# --- inputs -------------------------------------------------------------------------------

@dataclass
class Inputs:
    """Everything the page shows, gathered before anything is written."""

    cfg: Config
    train: dict[str, Any]
    evaluation: dict[str, Any]
    losses: pd.DataFrame
    samples: dict[str, bytes]          # direction -> grid PNG
    n_samples: int
    preview: bytes | None = None
    data_report: dict[str, Any] | None = None
    run_id: str = ""
    run_name: str = ""
    epoch_history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    comparison: Comparison | None = None


def read_local_inputs(cfg: Config) -> Inputs:
    """The files of the pipeline's stages, and the sample grids computed from the generators."""
    data = PreparedDataset.of(cfg.data.dataset, TEST_SPLITS)
    generators = paths.GENERATORS
    _require({generators["G_A"]: "train", generators["G_B"]: "train", paths.TRAIN_METRICS: "train",
              paths.TRAIN_LOSSES: "train", paths.TRAIN_EVAL: "train", paths.EVAL_DETAILS: "evaluate"})
    try:
        losses = pd.read_csv(paths.TRAIN_LOSSES)
    except (ValueError, pd.errors.EmptyDataError):
        raise UserError(f"{paths.TRAIN_LOSSES}: not a loss table; run `dvc repro train` again") from None
    if "step" not in losses or "lr" not in losses or "epoch" not in losses:
        raise UserError(f"{paths.TRAIN_LOSSES}: no step/epoch/lr columns; run `dvc repro train` again")
    try:
        per_epoch = pd.read_csv(paths.TRAIN_EVAL)
        epoch_history = {during_training(k): [(int(e), float(v))
                                              for e, v in zip(per_epoch["epoch"], per_epoch[k])]
                         for k in per_epoch.columns if k != "epoch" and len(per_epoch)}
    except (ValueError, KeyError, pd.errors.EmptyDataError):
        raise UserError(f"{paths.TRAIN_EVAL}: not a per-epoch FID/KID table; "
                        f"run `dvc repro train` again") from None

    device = resolve_device(cfg.eval.device, "eval.device")
    nets = {d.generator: load_generator(generators[d.generator], device) for d in DIRECTIONS}
    n = cfg.eval.n_samples
    samples = {}
    if n:
        for d in DIRECTIONS:
            images = np.array(data.array(d.source)[:n])
            if len(images):
                with exact_fp32():  # as translate computes them
                    samples[d.name] = png_bytes(sample_grid(images, nets[d.generator], nets[d.back], device))

    inputs = Inputs(cfg=cfg, train=_read_json(paths.TRAIN_METRICS, "train"),
                    evaluation=_read_json(paths.EVAL_DETAILS, "evaluate"),
                    losses=losses, samples=samples, n_samples=n, epoch_history=epoch_history)
    if paths.DATASET_PREVIEW.is_file():
        inputs.preview = paths.DATASET_PREVIEW.read_bytes()
    if paths.DATA_REPORT.is_file():
        inputs.data_report = _read_json(paths.DATA_REPORT, "prepare")
    return inputs


def read_run_inputs(inputs: Inputs, mlflow) -> None:
    """What only the MLflow store knows: the run's identity and the other runs."""
    run = mlflow.active_run()
    inputs.run_id = run.info.run_id
    inputs.run_name = run.info.run_name or ""
    try:
        # This run is still open (status RUNNING) while the report reattaches to it.
        runs = load_mlflow(mlflow.get_tracking_uri(), include=[inputs.run_id])
        if len(runs) > 1:
            comparison = select(runs)
            if len(comparison.table) > 1:
                inputs.comparison = comparison
    except UserError:
        pass  # other runs without FID/KID, or none at all: the page has no comparison


# --- page ---------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.2rem; }
.muted { color: #666; font-size: .92rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .92rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f5f5f5; }
img { max-width: 100%; }
.grid { display: flex; gap: .6rem; align-items: stretch; margin: .4rem 0 1.2rem; }
.grid .labels { display: flex; flex-direction: column; justify-content: space-around; text-align: right;
                font-size: .85rem; color: #444; }
img.pixels { image-rendering: pixelated; }
code { background: #f3f3f3; padding: 0 .25rem; border-radius: 3px; }
"""


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _img(png: bytes, alt: str, zoom: bool = False) -> str:
    """An inline PNG; `zoom` enlarges small pixel images (the test images may be 32 px) sharply."""
    data = base64.b64encode(png).decode("ascii")
    size = ""
    if zoom:
        # PNG's IHDR chunk: the width is the big-endian int at bytes 16..20.
        width = min(int.from_bytes(png[16:20], "big") * ZOOM, MAX_ZOOMED_WIDTH)
        size = f' width="{width}" class="pixels"'
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"{size}>'


def _table(rows: Iterable[Iterable[Any]], header: Iterable[str] | None = None) -> str:
    def cell(v: Any, tag: str = "td") -> str:
        if isinstance(v, dict):  # nested protocol entries become nested tables
            return f"<{tag}>{_table(v.items())}</{tag}>"
        cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
        return f"<{tag}{cls}>{html.escape(_fmt(v))}</{tag}>"

    head = "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _header(inputs: Inputs) -> str:
    cfg = inputs.cfg
    last = inputs.losses.iloc[-1] if len(inputs.losses) else None
    facts = [
        ("dataset", cfg.data.dataset), ("image size", cfg.data.crop_size),
        ("generator", f"{cfg.model.netG}, ngf {cfg.model.ngf}"), ("discriminator", f"{cfg.model.netD}, ndf "
                                                                                   f"{cfg.model.ndf}"),
        ("lambda_cycle", cfg.lambda_cycle), ("lambda_identity", cfg.lambda_identity),
        ("identity_weight_effective", cfg.identity_weight),
        ("epochs", f"{last['epoch'] if last is not None else '?'} of "
                   f"{cfg.train.n_epochs + cfg.train.n_epochs_decay}"),
        ("steps", last["step"] if last is not None else "?"), ("train.device", cfg.train.device),
    ]
    if inputs.run_id:
        run = f"{inputs.run_name} ({inputs.run_id})" if inputs.run_name else inputs.run_id
        facts.append(("MLflow run", run))
    return (f"<h1>CycleGAN report: {html.escape(cfg.data.dataset)}</h1>\n"
            f'<p class="muted">Written by <code>cyclegan report</code> from the outputs of '
            f"<code>dvc repro</code>; self-contained, works offline.</p>\n{_table(facts)}")


def _dataset_section(inputs: Inputs) -> str:
    parts = []
    if inputs.preview:
        parts.append(_img(inputs.preview, "dataset preview", zoom=True))
    else:
        parts.append(f'<p class="muted">No {paths.DATASET_PREVIEW} (written by <code>dvc repro '
                     f'prepare</code>).</p>')
    report = inputs.data_report or {}
    counts = report.get("counts")
    if isinstance(counts, dict):
        rows = [(split, c.get("found"), c.get("used"), c.get("skipped")) for split, c in counts.items()]
        parts.append(_table(rows, ("split", "found", "used", "skipped")))
    for warning in report.get("warnings") or []:
        parts.append(f'<p class="muted">Warning: {html.escape(str(warning))}</p>')
    return _section("dataset", "Dataset", "\n".join(parts))


def _losses_section(loss_png: bytes) -> str:
    body = (_img(loss_png, "training loss curves")
            + f'<p class="muted">From {paths.TRAIN_LOSSES}, one point every train.log_every steps.</p>')
    return _section("losses", "Training losses", body)


def _epoch_section(epoch_png: bytes, history: dict[str, list[tuple[int, float]]]) -> str:
    # Best and final differ by several FID points on small test sets; papers mix them up,
    # so both are shown and labelled.
    rows = []
    for key, points in sorted(history.items()):
        if points:
            best_epoch, best = min(points, key=lambda p: p[1])
            final_epoch, final = points[-1]
            rows.append([key, f"{_fmt(best)} (epoch {best_epoch})", f"{_fmt(final)} (epoch {final_epoch})"])
    body = (_img(epoch_png, "FID and KID per epoch")
            + _table(rows, ["metric", "best (lowest) during training", "final (last evaluation)"])
            + f'<p class="muted">From {paths.TRAIN_EVAL}, scored during training (train.eval_every); '
              f'the metrics below are the final models\' scores.</p>')
    return _section("per-epoch", "FID/KID per epoch", body)


def _samples_section(inputs: Inputs) -> str:
    if not inputs.samples:
        return _section("samples", "Test samples", '<p class="muted">eval.n_samples is 0: no samples.</p>')
    parts = []
    for direction, png in inputs.samples.items():
        d = direction_named(direction)
        split, forward, backward = d.source, d.generator, d.back
        details = (f"({split})", f"{forward}(x)", f"{backward}({forward}(x))", f"{backward}(x)")
        labels = [f"{row} {detail}" for row, detail in zip(SAMPLE_ROWS, details)]
        parts.append(
            f"<h3>{direction[0]} &rarr; {direction[2]}</h3>\n<div class=\"grid\"><div class=\"labels\">"
            + "".join(f"<div>{html.escape(label)}</div>" for label in labels)
            + f"</div>{_img(png, f'{direction} samples', zoom=True)}</div>")
    keys = " and ".join(f"<code>{tracking.sample_image_key(d)}</code>" for d in inputs.samples)
    intro = (f'<p class="muted">The first {inputs.n_samples} test images of each domain (eval.n_samples), '
             f"one per column. In MLflow, train logs these grids after every epoch as images {keys} with "
             "step = epoch: select runs on the experiment page and Compare, and the image charts put "
             "the runs' grids side by side, with a slider over the epochs (also under samples/ in each "
             "run's artifacts).</p>")
    return _section("samples", "Test samples", intro + "\n".join(parts))


def _metrics_section(inputs: Inputs) -> str:
    ev = inputs.evaluation
    scalars = {k: v for k, v in ev.items() if not isinstance(v, (dict, list))}
    directions = [d for d in SCORED if metric(FID, d) in scalars]
    rows = [(d, *(scalars.get(metric(kind, d), "") for kind in (FID, KID, KID_STD))) for d in directions]
    shown = {metric(kind, d) for d in directions for kind in (FID, KID, KID_STD)}
    parts = [
        "<h3>FID and KID</h3>",
        _table(rows, ("comparison", "FID", "KID", "KID std")),
        '<p class="muted">A2B: translations of testA against real testB; B2A: translations of testB '
        "against real testA; baseline: real testA against real testB (translating by doing nothing). "
        "Lower is better.</p>",
    ]
    parts += _literature_parts(scalars, ev.get("protocol"))
    shown |= {metric(kind, d) for d in SCORED for kind in LITERATURE}
    others = [(k, v) for k, v in sorted(scalars.items()) if k not in shown]
    if others:
        parts += ["<h3>Other evaluation metrics</h3>", _table(others, ("metric", "value"))]
    protocol = ev.get("protocol")
    if isinstance(protocol, dict):
        parts += ["<h3>Protocol</h3>", _table(protocol.items(), ("", ""))]
    parts += [f"<h3>Training ({paths.TRAIN_METRICS})</h3>",
              _table(sorted(inputs.train.items()), ("metric", "value"))]
    return _section("metrics", f"Metrics ({paths.EVAL_DETAILS})", "\n".join(parts))


def _literature_parts(scalars: dict[str, Any], protocol: Any) -> list[str]:
    """clean-FID, precision and recall per comparison, and the published figures they compare with."""
    directions = [d for d in SCORED if metric(CLEANFID, d) in scalars]
    if not directions:
        return []
    rows = [(d, scalars.get(metric(literature_metrics.LEGACY_IS, d), ""),
             *(scalars.get(metric(kind, d), "") for kind in (CLEANFID, PRECISION, RECALL)))
            for d in directions]
    counts = protocol.get("counts", {}) if isinstance(protocol, dict) else {}
    size = protocol.get("image_size", "?") if isinstance(protocol, dict) else "?"
    ours = (f"ours: {counts.get(A2B.name, '?')} translated {A2B.source} images against "
            f"{counts.get(A2B.target, '?')} real {A2B.target} images at {size} px, "
            f"{protocol.get('dataset', '?') if isinstance(protocol, dict) else '?'}")
    published = [(r["source"], r["model"], "" if r["legacy_fid"] is None else r["legacy_fid"],
                  "" if r["clean_fid"] is None else r["clean_fid"], r["protocol"], r["compare_with"])
                 for r in literature_metrics.PUBLISHED]
    return [
        "<h3>Scores to set beside published ones</h3>",
        _table(rows, ("comparison", "legacy FID (= FID above)", "clean-FID", "precision", "recall")),
        f'<p class="muted">{html.escape(literature_metrics.METRICS[CLEANFID])}. Legacy FID: clean-fid\'s '
        f"{literature_metrics.LEGACY_MODE} mode, which with this network is the FID above. "
        f"Precision: {html.escape(literature_metrics.METRICS[PRECISION])}; recall: "
        f"{html.escape(literature_metrics.METRICS[RECALL])}. Higher is better for both; high precision "
        "with low recall is mode collapse.</p>",
        "<h4>Published horse2zebra FIDs (testA &rarr; B)</h4>",
        _table(published, ("source", "model", "legacy FID", "clean-FID", "protocol", "compares with")),
        f'<p class="muted">{html.escape(ours)}. Only the same protocol compares: the clean-fid '
        "leaderboard's is ours with data.dataset horse2zebra and data.crop_size 256 (A2B, legacy FID = "
        f"{metric(FID, A2B.name)}, clean-FID = {metric(CLEANFID, A2B.name)}); FID of ~130 images moves by "
        "several points between seeds and samples.</p>",
    ]


def _comparison_section(comparison: Comparison, run_id: str) -> str:
    table = comparison.table
    id_col = list(table.columns).index("id")
    rows = [list(r) for r in table.itertuples(index=False)]
    for row in rows:
        if run_id.startswith(str(row[id_col])):
            row[id_col] = f"{row[id_col]} (this run)"
    body = _table(rows, list(table.columns))
    intro = (f'<p class="muted">Finished runs of the MLflow experiment "{tracking.EXPERIMENT}", by '
             f"{html.escape(comparison.param)}; <code>cyclegan compare</code> writes the same table "
             "to reports/compare.csv.</p>")
    return _section("experiments", "Experiments",
                    intro + body + _img(plot_png(comparison), "metrics vs param"))


def render(inputs: Inputs, figures: dict[str, bytes | None], with_run: bool = False) -> str:
    """The page; `with_run` adds what only the MLflow store knows (the copy logged to the run)."""
    sections = [
        _header(inputs),
        _dataset_section(inputs),
        _losses_section(figures["losses"]),
    ]
    if figures.get("per_epoch"):
        sections.append(_epoch_section(figures["per_epoch"], inputs.epoch_history))
    sections += [_samples_section(inputs), _metrics_section(inputs)]
    if with_run and inputs.comparison is not None:
        sections.append(_comparison_section(inputs.comparison, inputs.run_id))
    title = f"CycleGAN report: {inputs.cfg.data.dataset}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def _write_png(path: Path, png: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return path


def build(cfg: Config) -> Path:
    """Write reports/index.html and its PNGs, and log them to the run; returns the page's path."""
    inputs = read_local_inputs(cfg)
    figures: dict[str, bytes | None] = {
        "losses": loss_curves_png(inputs.losses),
        "per_epoch": epoch_metrics_png(inputs.epoch_history) if inputs.epoch_history else None}
    written = [_write_png(LOSS_PNG, figures["losses"])]
    if figures["per_epoch"]:
        written.append(_write_png(EPOCH_PNG, figures["per_epoch"]))
    written += [_write_png(SAMPLE_PNG[d], png) for d, png in inputs.samples.items()]
    for stale in {EPOCH_PNG, *SAMPLE_PNG.values()} - set(written):  # from an earlier report
        stale.unlink(missing_ok=True)
    write_text(REPORT, render(inputs, figures))
    with tracking.reattach(cfg) as mlflow:
        read_run_inputs(inputs, mlflow)
        mlflow.log_text(render(inputs, figures, with_run=True), f"{ARTIFACT_DIR}/{REPORT.name}")
        for path in written:
            mlflow.log_artifact(str(path), ARTIFACT_DIR)
    print(f"cyclegan report: {REPORT} (+ {', '.join(p.name for p in written)}), logged to MLflow run "
          f"{inputs.run_id}", file=sys.stderr)
    return REPORT


def main(cfg: Config, args=None) -> None:
    build(cfg)
