"""Stage `download`: put the dataset named by data.dataset into data/raw/<name>/.

The embedded toy dataset is generated; registry datasets are downloaded and verified; a folder
is validated and copied (its entries that are not files skipped or fatal, data.on_bad_image). data/raw is a persistent DVC output, so datasets fetched earlier stay
when data.dataset changes, and each one is skipped while its marker says it is complete.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
from pathlib import Path

from .. import datasets
from ..datasets import toy
from ..config import Config
from ..fileio import atomic_dir
from ..paths import RAW


def _toy_marker(cfg: Config) -> dict:
    # The generator's own source is part of the key: DVC reruns this stage when it changes, and
    # the data must then change with it.
    generator = hashlib.sha256(Path(toy.__file__).read_bytes()).hexdigest()
    return {"kind": "toy", "dataset": toy.NAME, "toy": dataclasses.asdict(cfg.data.toy),
            "generator_sha256": generator}


def generate_toy(cfg: Config, raw_root: Path = RAW) -> str:
    dest = raw_root / toy.NAME
    marker = _toy_marker(cfg)
    if datasets.read_marker(dest) == marker:
        return f"{dest}: up to date (data.toy unchanged)"
    with atomic_dir(dest) as tmp:
        toy.generate(tmp, **dataclasses.asdict(cfg.data.toy))
        datasets.write_marker(tmp, marker)
    counts = datasets.split_counts(dest)
    return f"{dest}: generated ({', '.join(f'{k} {v}' for k, v in counts.items())})"


def run(cfg: Config, raw_root: Path = RAW) -> Path:
    """Materialise data.dataset under raw_root; returns its folder."""
    source = datasets.resolve(cfg.data.dataset)
    if source.kind == "toy":
        message = generate_toy(cfg, raw_root)
    elif source.kind == "registry":
        message = datasets.fetch(source.info, raw_root)
    else:
        message = datasets.import_folder(source.path, raw_root / source.name, cfg.data.on_bad_image)
    print(message)
    return raw_root / source.name


def main(cfg: Config, args: argparse.Namespace) -> None:
    run(cfg)
