"""One of the authors' datasets into data/raw/<name>: downloaded (or taken from a mirror), extracted
safely and verified against its sha256 list or its official file counts."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_dir, sha256_file
from ..images import list_files
from ..prepared_data import SPLITS, TARGET_SPLITS
from .archive import safe_extract
from .folder import copy_images
from .http import http_download, mirror
from .markers import fmt_counts, read_marker, split_counts, write_marker
from .registry import BASE_URL, URL_ENV, DatasetInfo
from .sources import FOLDER_LAYOUT


def load_sha256sums(resource: str) -> dict[str, str]:
    """{"testA/x.jpg": sha256} from a package resource in `sha256sum` format."""
    text = resources.files("cyclegan").joinpath("resources", resource).read_text()
    sums = {}
    for line in text.splitlines():
        if line.strip():
            digest, path = line.split(maxsplit=1)
            sums[path.lstrip("*").removeprefix("./")] = digest.lower()
    return sums


def verify(root: Path, info: DatasetInfo, *, label: str) -> dict[str, int]:
    """Check an extracted dataset against what is known of the official one; returns counts.

    With a sha256 list every file present must be listed and match; the per-split counts then
    make sure none is missing. Tests that serve a subset pass a DatasetInfo with the subset's counts.
    """
    for split in SPLITS:
        if not (root / split).is_dir():
            raise UserError(f"{label}: the archive has no {split}/ folder; it is not a CycleGAN dataset "
                            f"({FOLDER_LAYOUT})")
    if info.sha256sums:
        sums = load_sha256sums(info.sha256sums)
        present = [f"{s}/{rel}" for s in (*SPLITS, *TARGET_SPLITS) if (root / s).is_dir()
                   for rel in list_files(root / s)]
        for rel in present:
            if rel not in sums:
                raise UserError(f"{label}: {rel} is not a file of the official {info.name}; the archive is "
                                f"not the official one: delete it or fix {URL_ENV}")
        # sha256 releases the GIL: two threads keep two cores busy.
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(lambda rel: sha256_file(root / rel), present))
        for rel, digest in zip(present, digests, strict=True):
            if digest != sums[rel]:
                raise UserError(f"{label}: {rel} fails its sha256 check (got {digest[:16]}..., expected "
                                f"{sums[rel][:16]}...); the download is corrupt or modified: download again")
    counts = split_counts(root)
    for split in SPLITS:
        expected = info.counts[split] if info.counts else None
        if expected is not None and counts[split] != expected:
            raise UserError(f"{label}: {split}/ holds {counts[split]} images, the official {info.name} has "
                            f"{expected}; the archive is incomplete or not the official one")
        if not counts[split]:
            raise UserError(f"{label}: {split}/ holds no images; the archive is incomplete")
    return counts


def _locate(base: str, name: str) -> tuple[str, str | Path]:
    """('http', url) | ('zip', path) | ('dir', path) for <name> under the base location."""
    folder = mirror(base, URL_ENV)
    if isinstance(folder, str):
        return "http", f"{folder}/{name}.zip"
    if not folder.is_dir():
        raise UserError(f"{URL_ENV}={base}: no such folder; point it at a folder holding {name}.zip or "
                        f"{name}/, or unset it to download from {BASE_URL}")
    if (folder / f"{name}.zip").is_file():
        return "zip", folder / f"{name}.zip"
    if (folder / name).is_dir():
        return "dir", folder / name
    raise UserError(f"{URL_ENV}={base}: holds neither {name}.zip nor {name}/; put the dataset there or "
                    f"unset {URL_ENV} to download from {BASE_URL}")


def is_complete(dest: Path, name: str) -> bool:
    """data/raw/<name> holds a verified download whose files are all still there."""
    marker = read_marker(dest)
    return bool(marker and marker.get("kind") == "download" and marker.get("dataset") == name
                and marker.get("counts") == split_counts(dest))


def fetch(info: DatasetInfo, raw_root: Path) -> str:
    """Download (or take from CYCLEGAN_DATASETS_URL), extract and verify into raw_root/<name>."""
    dest = raw_root / info.name
    if is_complete(dest, info.name):
        return f"{dest}: already downloaded and verified; delete the folder to fetch it again"
    base = os.environ.get(URL_ENV) or BASE_URL
    kind, where = _locate(base, info.name)
    label = str(where)
    with atomic_dir(dest) as tmp:
        if kind == "http":
            part = raw_root / f".{info.name}.zip.part"
            http_download(str(where), part, name=info.name, url_env=URL_ENV)
            # Complete from here on: whatever happens next, the file is not worth resuming.
            try:
                safe_extract(part, tmp, label=label)
                counts = verify(tmp, info, label=label)
            finally:
                part.unlink(missing_ok=True)
        elif kind == "zip":
            safe_extract(Path(where), tmp, label=label)
            counts = verify(tmp, info, label=label)
        else:
            _, skipped = copy_images(Path(where), tmp)
            if skipped:
                raise UserError(f"{label}: {skipped[0]['file']}: {skipped[0]['reason']}; the official "
                                f"{info.name} holds files only: fix that folder, or unset {URL_ENV}")
            counts = verify(tmp, info, label=label)
        checked = ("sha256 of every file" if info.sha256sums
                   else "official file counts" if info.counts else "non-empty splits")
        write_marker(tmp, {"kind": "download", "dataset": info.name, "source": label, "counts": counts,
                           "verified": checked})
    return f"{dest}: fetched from {label}, verified ({checked}): {fmt_counts(counts)}"
