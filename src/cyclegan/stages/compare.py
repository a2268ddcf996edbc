"""`cyclegan compare`: experiments side by side, and their FID/KID against one param, over seeds.

Reads `dvc exp show` or the MLflow store (cyclegan.comparison) and writes reports/compare.csv
(the runs), compare_settings.csv (per setting: n, mean, std, 95% interval), compare_differences.csv
(which differences exceed the seed spread), compare.md (all three) and compare.png.
It also tags the MLflow runs of finished DVC experiments with the commit `dvc exp` made for each
(tracking.link_experiment_commits): no stage can, as DVC commits after the last one.
"""
from __future__ import annotations

import sys

import pandas as pd

from .. import tracking
from ..comparison import (DEFAULT_METRICS, DEFAULT_PARAM, SOURCES, compare, differences, differences_table,
                          settings_table, summarize, write_outputs)
from ..config import Config
from ..vocabulary import LITERATURE


SEEDS_HELP = (
    "Runs that differ only in `seed` are repeats of one setting. Per setting and metric it reports n "
    "(the runs), their seeds, the mean, the standard deviation and the 95% interval of the mean "
    "(Student's t over the seeds); for each pair of settings, the difference of the means with its "
    "95% interval (Welch), marked as exceeding the seed spread when that interval excludes 0. Other "
    "params that differ between runs make settings of their own. Writes reports/compare.csv (the "
    "runs), compare_settings.csv, compare_differences.csv, compare.md (all three) and compare.png."
)


def add_arguments(parser) -> None:
    parser.epilog = SEEDS_HELP
    parser.add_argument("--param", default=DEFAULT_PARAM,
                        help=f"param on the x axis, as in params.yaml (default: {DEFAULT_PARAM})")
    parser.add_argument("--metric", action="append", dest="metrics", metavar="METRIC",
                        help=f"metric to compare; repeat for more (default: {' '.join(DEFAULT_METRICS)}; "
                             f"{', '.join(f'{kind}_*' for kind in LITERATURE)} are in MLflow only: "
                             "--source mlflow)")
    parser.add_argument("--source", choices=SOURCES, default="dvc",
                        help="dvc: `dvc exp show`; mlflow: the runs in the MLflow store (default: dvc)")


def main(cfg: Config, args=None) -> None:
    source = getattr(args, "source", None) or "dvc"
    linked = tracking.link_experiment_commits()
    comparison = compare(source, getattr(args, "param", None) or DEFAULT_PARAM,
                         getattr(args, "metrics", None))
    files = write_outputs(comparison)
    summary, diffs = summarize(comparison), differences(comparison)
    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.max_colwidth", 60):
        print(settings_table(comparison, summary).to_string(index=False))
        if len(diffs):
            print("\nDifferences (setting minus the other, 95% interval, Welch):")
            print(differences_table(diffs).to_string(index=False))
        print("\nRuns:")
        print(comparison.table.to_string(index=False))
    note = f"; {linked} MLflow runs tagged with their dvc exp commit" if linked else ""
    print(f"cyclegan compare: {len(comparison.table)} experiments in {len(summary)} settings from {source} "
          f"-> "
          f"{', '.join(map(str, files))}{note}", file=sys.stderr)
