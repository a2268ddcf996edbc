"""The CycleGAN authors' datasets by name: what data.dataset may name, and their official counts.

Fetching one is official.py; this list is all that resolving a name needs.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

BASE_URL = "https://efrosgans.eecs.berkeley.edu/cyclegan/datasets"
URL_ENV = "CYCLEGAN_DATASETS_URL"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    # Image files per split in the official zip; None where not known (then each split must
    # just be non-empty).
    counts: Mapping[str, int] | None = None
    # Package resource listing the sha256 of every file ("<sha>  ./testA/x.jpg").
    sha256sums: str | None = None


def _counts(train_a: int, train_b: int, test_a: int, test_b: int) -> dict[str, int]:
    return {"trainA": train_a, "trainB": train_b, "testA": test_a, "testB": test_b}


# Counts of the official zips as published in the TensorFlow Datasets catalog (cycle_gan), which
# are built from the same files; horse2zebra's also match its SHA256SUMS list.
REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("apple2orange", _counts(995, 1019, 266, 248)),
        DatasetInfo("summer2winter_yosemite", _counts(1231, 962, 309, 238)),
        DatasetInfo("horse2zebra", _counts(1067, 1334, 120, 140), "horse2zebra.SHA256SUMS"),
        DatasetInfo("monet2photo", _counts(1072, 6287, 121, 751)),
        DatasetInfo("cezanne2photo", _counts(525, 6287, 58, 751)),
        DatasetInfo("ukiyoe2photo", _counts(562, 6287, 263, 751)),
        DatasetInfo("vangogh2photo", _counts(400, 6287, 400, 751)),
        DatasetInfo("maps", _counts(1096, 1096, 1098, 1098)),
        DatasetInfo("facades", _counts(400, 400, 106, 106)),
        DatasetInfo("iphone2dslr_flower", _counts(1812, 3325, 569, 480)),
        DatasetInfo("ae_photos"),  # no published counts
    )
}
