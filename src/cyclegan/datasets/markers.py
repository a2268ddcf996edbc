"""What data/raw/<name> holds: the marker file each source writes there, and split counts."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..images import list_images
from ..prepared_data import SPLITS

MARKER = ".cyclegan.json"  # inside data/raw/<name>: where the content came from, what was checked


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_marker(folder: Path, data: dict) -> None:
    (folder / MARKER).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def split_counts(root: Path, splits: tuple[str, ...] = SPLITS) -> dict[str, int]:
    return {s: len(list_images(root / s)[0]) if (root / s).is_dir() else 0 for s in splits}


def fmt_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())
