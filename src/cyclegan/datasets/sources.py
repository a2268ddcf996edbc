"""data.dataset resolved to a source, and the one name every stage gives its folder.

A source is the embedded toy dataset (toy.py), one of the authors' datasets (registry.py) or a
user's folder (folder.py); materialise.py puts it into data/raw/<name>. Its `name` is that folder,
under data/raw and data/prepared alike: `folder_name` is what every stage calls it, so a source
whose name is not the last part of data.dataset still reaches all stages under one name.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import toy
from .registry import REGISTRY, DatasetInfo

FOLDER_LAYOUT = "trainA/ trainB/ testA/ testB/"

REFUSED = {
    "cityscapes": (
        "cityscapes cannot be downloaded: its licence does not allow redistribution. Register at "
        "https://www.cityscapes-dataset.com, download it there, arrange it as trainA/ trainB/ testA/ "
        "testB/ (the CycleGAN authors' datasets/prepare_cityscapes_dataset.py does this) and set "
        "data.dataset to that folder's path"
    ),
}


@dataclass(frozen=True)
class Source:
    kind: str  # how materialise.py fetches it: "toy", "registry" or "folder"
    name: str  # the folder name under data/raw and data/prepared
    info: DatasetInfo | None = None
    path: Path | None = None


def _toy(dataset: str) -> Source | None:
    return Source("toy", dataset) if dataset == toy.NAME else None


def _refused(dataset: str) -> Source | None:
    if dataset in REFUSED:
        raise UserError(f"data.dataset: {REFUSED[dataset]}")
    return None


def _registry(dataset: str) -> Source | None:
    return Source("registry", dataset, info=REGISTRY[dataset]) if dataset in REGISTRY else None


def _folder(dataset: str) -> Source | None:
    path = Path(dataset).expanduser()
    if not ("/" in dataset or os.sep in dataset or dataset.startswith((".", "~")) or path.is_dir()):
        return None
    # "." and ".." give no usable name.
    name = Path(dataset).name
    # The name becomes a folder under data/raw: it must be a plain, visible folder name.
    if name in ("", ".", "..") or name.startswith("."):
        raise UserError(
            f"data.dataset: {dataset!r} does not end in a folder name; write the folder's path "
            f"with its name, e.g. ../my_data"
        )
    return Source("folder", name, path=path)


# Tried in order: the first that recognises data.dataset gives its source (None: not mine).
RESOLVERS: list[Callable[[str], Source | None]] = [_toy, _refused, _registry, _folder]


def known_names() -> list[str]:
    return [toy.NAME, *REGISTRY]


def resolve(dataset: str) -> Source:
    """Interpret data.dataset; unknown names and unusable paths are a UserError."""
    for resolver in RESOLVERS:
        source = resolver(dataset)
        if source is not None:
            return source
    raise UserError(
        f"data.dataset: unknown dataset {dataset!r}; use one of {', '.join(known_names())}, "
        f"or the path of a folder holding {FOLDER_LAYOUT} (e.g. ./my_data)"
    )


def folder_name(dataset: str) -> str:
    """The folder of data.dataset under data/raw and data/prepared, for every stage."""
    return resolve(dataset).name
