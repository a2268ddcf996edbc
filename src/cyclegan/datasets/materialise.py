"""data.dataset into data/raw/<name>/: generated, downloaded or copied, by the kind of its source.

data/raw is a persistent DVC output, so datasets fetched earlier stay when data.dataset changes,
and each one is skipped while its marker says it is complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

from ..config import Config
from ..fileio import atomic_dir
from . import official, toy
from .folder import import_folder
from .markers import fmt_counts, read_marker, split_counts, write_marker
from .sources import Source


def _toy_marker(cfg: Config) -> dict:
    # The generator's own source is part of the key: DVC reruns this stage when it changes, and
    # the data must then change with it.
    generator = hashlib.sha256(Path(toy.__file__).read_bytes()).hexdigest()
    return {"kind": "toy", "dataset": toy.NAME, "toy": dataclasses.asdict(cfg.data.toy),
            "generator_sha256": generator}


def generate_toy(cfg: Config, source: Source, raw_root: Path) -> str:
    dest = raw_root / source.name
    marker = _toy_marker(cfg)
    if read_marker(dest) == marker:
        return f"{dest}: up to date (data.toy unchanged)"
    with atomic_dir(dest) as tmp:
        toy.generate(tmp, **dataclasses.asdict(cfg.data.toy))
        write_marker(tmp, marker)
    return f"{dest}: generated ({fmt_counts(split_counts(dest))})"


def fetch_official(cfg: Config, source: Source, raw_root: Path) -> str:
    return official.fetch(source.info, raw_root)


def copy_folder(cfg: Config, source: Source, raw_root: Path) -> str:
    return import_folder(source.path, raw_root / source.name, cfg.data.on_bad_image)


# Source.kind -> how it gets into data/raw/<name>; each returns the line the stage prints.
MATERIALISE: dict[str, Callable[[Config, Source, Path], str]] = {
    "toy": generate_toy,
    "registry": fetch_official,
    "folder": copy_folder,
}


def materialise(cfg: Config, source: Source, raw_root: Path) -> str:
    return MATERIALISE[source.kind](cfg, source, raw_root)
