"""`cyclegan compare`: experiments side by side, and their FID/KID against one param.

Reads `dvc exp show` or the MLflow store (cyclegan.comparison) and writes reports/compare.csv,
reports/compare.md and reports/compare.png.
"""
from __future__ import annotations

import sys

import pandas as pd

from ..comparison import DEFAULT_METRICS, DEFAULT_PARAM, SOURCES, compare, write_outputs
from ..config import Config


def add_arguments(parser) -> None:
    parser.add_argument("--param", default=DEFAULT_PARAM,
                        help=f"param on the x axis, as in params.yaml (default: {DEFAULT_PARAM})")
    parser.add_argument("--metric", action="append", dest="metrics", metavar="METRIC",
                        help=f"metric to compare; repeat for more (default: {' '.join(DEFAULT_METRICS)})")
    parser.add_argument("--source", choices=SOURCES, default="dvc",
                        help="dvc: `dvc exp show`; mlflow: the runs in the MLflow store (default: dvc)")


def main(cfg: Config, args=None) -> None:
    source = getattr(args, "source", None) or "dvc"
    comparison = compare(source, getattr(args, "param", None) or DEFAULT_PARAM, getattr(args, "metrics", None))
    files = write_outputs(comparison)
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(comparison.table.to_string(index=False))
    print(f"cyclegan compare: {len(comparison.table)} experiments from {source} -> "
          f"{', '.join(map(str, files))}", file=sys.stderr)
