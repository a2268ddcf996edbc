"""Stage `download`: put the dataset named by data.dataset into data/raw/<name>/.

The embedded toy dataset is generated; registry datasets are downloaded and verified; a folder
is validated and copied (its entries that are not files skipped or fatal, data.on_bad_image). How
each kind of source gets there: cyclegan.datasets.materialise.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Config
from ..datasets.materialise import materialise
from ..datasets.sources import resolve
from ..paths import RAW


def run(cfg: Config, raw_root: Path = RAW) -> Path:
    """Materialise data.dataset under raw_root; returns its folder."""
    source = resolve(cfg.data.dataset)
    print(materialise(cfg, source, raw_root))
    return raw_root / source.name


def main(cfg: Config, args: argparse.Namespace) -> None:
    run(cfg)
