"""Stage `prepare`: data/raw/<name>/ -> data/prepared/<name>/ in the format of cyclegan.prepared_data.

Every image is decoded with Pillow, turned upright (EXIF), converted to RGB (alpha over
data.alpha_background, 16-bit and float scaled) and resized with BICUBIC to a square, as the
official resize_and_crop does: training splits to load_size, test splits to crop_size. Bad files
are skipped or stop the stage (data.on_bad_image); either way metrics/data_report.json says why,
also for the entries of a user's folder that `download` left out (links to nothing, FIFOs, ...).
Decoding runs in worker processes; arrays are written straight into memory-mapped .npy files, so
memory stays flat whatever the dataset size. data/prepared is replaced whole, atomically.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import images
from ..datasets.markers import read_marker
from ..datasets.sources import FOLDER_LAYOUT, folder_name
from ..config import Config
from ..prepared_data import MANIFEST, SPLITS, TARGET_SPLITS
from ..errors import UserError
from ..fileio import atomic_dir, atomic_path, write_json
from ..paths import DATA_REPORT, DATASET_PREVIEW, PREPARED, RAW
# Below this many input bytes a process pool costs more to start (~1 s) than it saves: the
# embedded dataset (3 MB of small PNGs) decodes in half a second on one core.
PARALLEL_MIN_BYTES = 16 << 20
FORMAT_VERSION = 1


@dataclass
class Split:
    name: str  # trainA, ..., testA_target
    folder: Path
    files: list[str]
    size: int  # side of the stored square images
    partner: str | None = None  # testA <-> testA_target: kept or dropped together
    ok: list[bool] = field(default_factory=list)
    sha256: list[str | None] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=0,
                        help="decoding processes (default 0: one per CPU core, or 1 for small datasets)")


def main(cfg: Config, args: argparse.Namespace) -> None:
    run(cfg, workers=getattr(args, "workers", 0) or 0)


def _plan(cfg: Config, raw: Path) -> tuple[dict[str, Split], list[str]]:
    """The splits to read, and the non-image files that will be ignored."""
    if not raw.is_dir():
        raise UserError(f"{raw}: not found; run `cyclegan download` (or `dvc repro download`) first")
    splits: dict[str, Split] = {}
    ignored: list[str] = []
    for name in SPLITS:
        folder = raw / name
        if not folder.is_dir():
            raise UserError(f"{folder}: missing; data/raw/<name> must hold {FOLDER_LAYOUT}; "
                            f"run `cyclegan download` again")
        files, others = images.list_images(folder)
        ignored += [f"{name}/{o}" for o in others]
        size = cfg.data.load_size if name.startswith("train") else cfg.data.crop_size
        splits[name] = Split(name, folder, files, size)
    for name in TARGET_SPLITS:
        folder = raw / name
        if folder.is_dir():
            files, others = images.list_images(folder)
            ignored += [f"{name}/{o}" for o in others]
            test = name.removesuffix("_target")
            # The target of test image i must be row i: read the test split's names here.
            splits[name] = Split(name, folder, splits[test].files, cfg.data.crop_size, partner=test)
            splits[test].partner = name
            present = set(files)
            splits[name].reasons = {i: f"missing; every {test}/ image needs a file of the same name in "
                                       f"{name}/"
                                    for i, f in enumerate(splits[test].files) if f not in present}
    return splits, ignored


def _workers(requested: int, paths: Iterable[str]) -> int:
    if requested > 0:
        return requested
    if sum(os.path.getsize(p) for p in paths) < PARALLEL_MIN_BYTES:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def _load_all(jobs: list[images.Job], workers: int) -> Iterator[images.Loaded]:
    """images.load over jobs, in order; in worker processes when it pays."""
    if workers <= 1:
        yield from map(images.load, jobs)
        return
    # forkserver/spawn, not fork: the parent has usually imported torch (threads) by now. Workers
    # re-import the __main__ script, so a script driving this keeps torch out of its top level
    # (as benchmarks/data.py does); the cyclegan CLI and pytest entry points are light.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
    try:
        yield from pool.map(images.load, jobs, chunksize=max(1, min(32, len(jobs) // (workers * 8))))
    finally:
        # On an early stop (data.on_bad_image: fail) do not wait for the remaining images.
        pool.shutdown(wait=True, cancel_futures=True)


def _new_array(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A uint8 .npy file mapped for writing, its disk blocks allocated now.

    A new .npy is sparse: on a full disk, writing through the map later kills the process with
    SIGBUS. Allocating up front turns that into ENOSPC, one line (cli), before any decoding.
    """
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot say
                    raise
    return arr


def _array_sha256(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    for start in range(0, len(arr), 256):
        h.update(np.ascontiguousarray(arr[start:start + 256]).data)
    return h.hexdigest()


def _compact(path: Path, arr: np.ndarray, keep: list[int]) -> np.ndarray:
    """Rewrite a .npy keeping rows `keep` only (after skips), chunk by chunk."""
    if len(keep) == len(arr):
        return arr
    tmp = path.with_name(path.name + ".tmp")
    out = _new_array(tmp, (len(keep), *arr.shape[1:]))
    for start in range(0, len(keep), 256):
        out[start:start + 256] = arr[keep[start:start + 256]]
    out.flush()
    del out, arr
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def _duplicates(splits: dict[str, Split]) -> tuple[list[list[str]], list[list[str]]]:
    """Groups of identical decoded images: (across train and test, the others)."""
    by_hash: dict[str, list[str]] = defaultdict(list)
    for s in splits.values():
        if s.name in TARGET_SPLITS:
            continue  # targets are expected to resemble the other domain's images
        for f, ok, h in zip(s.files, s.ok, s.sha256, strict=True):
            if ok:
                by_hash[h].append(f"{s.name}/{f}")
    groups = [sorted(g) for g in by_hash.values() if len(g) > 1]
    train_test = [g for g in groups if {p.split("/")[0][:-1] for p in g} >= {"train", "test"}]
    within = [g for g in groups if g not in train_test]
    return sorted(train_test), sorted(within)


def write_preview(a: np.ndarray, b: np.ndarray, path: Path, n: int = 4, pad: int = 2) -> None:
    """A row of A images above a row of B images, laid out like torchvision's make_grid.

    Plain NumPy + Pillow: importing torchvision would cost this stage seconds for one PNG.
    """
    k = min(n, len(a), len(b))
    h, w = a.shape[1:3]
    grid = np.zeros((pad + 2 * (h + pad), pad + k * (w + pad), 3), dtype=np.uint8)
    for r, row in enumerate((a, b)):
        for c in range(k):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y:y + h, x:x + w] = row[c]
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


def _bad(s: Split, i: int, reason: str) -> UserError:
    return UserError(f"{s.folder / s.files[i]}: {reason}; fix or remove the file, "
                     f"or set data.on_bad_image: skip in params.yaml")


def run(cfg: Config, *, raw_root: Path = RAW, prepared_root: Path = PREPARED,
        report_path: Path = DATA_REPORT, preview_path: Path = DATASET_PREVIEW, workers: int = 0) -> dict:
    """Prepare data.dataset; returns the data report (also written to report_path)."""
    started = time.perf_counter()
    name = folder_name(cfg.data.dataset)
    raw = raw_root / name
    splits, ignored = _plan(cfg, raw)
    left_out = _check_before_decoding(cfg, raw, splits)
    jobs = [(s, i) for s in splits.values() for i in range(len(s.files)) if i not in s.reasons]
    work = [images.Job(str(s.folder / s.files[i]), s.size, cfg.data.crop_size,
                       tuple(cfg.data.alpha_background), images.MAX_PIXELS) for s, i in jobs]
    n_workers = _workers(workers, (j.path for j in work))
    report = {"dataset": cfg.data.dataset, "name": name, "on_bad_image": cfg.data.on_bad_image,
              "load_size": cfg.data.load_size, "crop_size": cfg.data.crop_size}

    with atomic_dir(prepared_root) as tmp_root:
        out = tmp_root / name
        out.mkdir()
        # Rows are written where they belong as results arrive; skipped rows are squeezed out at
        # the end (_compact), so no split is ever held in memory whole.
        arrays = {s.name: _new_array(out / f"{s.name}.npy", (len(s.files), s.size, s.size, 3))
                  for s in splits.values()}
        modes = _decode(splits, jobs, work, arrays, n_workers, cfg.data.on_bad_image, name)
        _drop_partners_together(splits)
        warnings = _complete_report(report, splits, left_out, ignored, modes, report_path)
        _refuse_empty_splits(report, raw, report_path)
        manifest = _write_arrays(cfg, splits, arrays, out, raw, name, len(report["skipped"]), preview_path)

    # The report is a DVC output, hashed: no timings or machine facts in it, only the terminal's.
    elapsed = time.perf_counter() - started
    report["content_sha256"] = manifest["content_sha256"]
    write_json(report_path, report)
    for line in warnings:
        print(f"cyclegan prepare: warning: {line}", file=sys.stderr)
    summary = ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
    print(f"{prepared_root / name}: {summary} ({len(report['skipped'])} skipped) in {elapsed:.1f} s "
          f"({len(work) / elapsed:.1f} images/s, {n_workers} worker{'s' * (n_workers > 1)})")
    return report


def _check_before_decoding(cfg: Config, raw: Path, splits: dict[str, Split]) -> list[dict[str, str]]:
    """Under data.on_bad_image: fail, what is already known bad stops the stage now; returns the
    entries of a user's folder that `download` left out of data/raw (links to nothing, FIFOs, ...),
    reported with the bad images."""
    fail = cfg.data.on_bad_image == "fail"
    missing = next(((s, i, r) for s in splits.values() for i, r in s.reasons.items()), None)
    if fail and missing:  # a test image without its target
        raise _bad(*missing)
    marker = read_marker(raw) or {}
    left_out = marker.get("skipped", [])
    if fail and left_out:
        raise UserError(f"{Path(marker.get('source', raw)) / left_out[0]['file']}: {left_out[0]['reason']}; "
                        f"fix or remove it, or set data.on_bad_image: skip in params.yaml")
    return left_out


def _decode(splits: dict[str, Split], jobs: list[tuple[Split, int]], work: list[images.Job],
            arrays: dict[str, np.memmap], n_workers: int, policy: str, name: str) -> Counter[str]:
    """Every image into its row of its split's array; returns the count of each source colour mode."""
    modes: Counter[str] = Counter()
    for s in splits.values():
        s.ok, s.sha256 = [False] * len(s.files), [None] * len(s.files)
    with tqdm(total=len(work), unit="img", desc=f"prepare {name}", disable=None, leave=False) as bar:
        for (s, i), result in zip(jobs, _load_all(work, n_workers), strict=True):
            bar.update()
            if result.reason is not None:
                if policy == "fail":
                    raise _bad(s, i, result.reason)
                s.reasons[i] = result.reason
                continue
            arrays[s.name][i] = result.pixels
            s.ok[i], s.sha256[i] = True, result.sha256
            modes[result.mode] += 1
    return modes


def _drop_partners_together(splits: dict[str, Split]) -> None:
    """A test image and its target are kept or dropped together."""
    for s in splits.values():
        if s.partner:
            p = splits[s.partner]
            for i in range(len(s.files)):
                if s.ok[i] and not p.ok[i]:
                    s.ok[i] = False
                    s.reasons[i] = f"dropped with {p.name}/{p.files[i]} ({p.reasons.get(i, 'unusable')})"


def _complete_report(report: dict, splits: dict[str, Split], left_out: list[dict[str, str]],
                     ignored: list[str], modes: Counter[str], report_path: Path) -> list[str]:
    """Counts, skipped files, duplicates into `report`; returns the warnings for the terminal."""
    skipped = [{"file": f"{s.name}/{s.files[i]}", "reason": s.reasons[i]}
               for s in splits.values() for i in sorted(s.reasons)]
    counts = {s.name: {"found": len(s.files), "used": sum(s.ok), "skipped": len(s.files) - sum(s.ok)}
              for s in splits.values()}
    for entry in left_out:
        skipped.append(entry)
        split = counts.get(entry["file"].split("/")[0])
        if split is not None:
            split["found"] += 1
            split["skipped"] += 1
    train_test, within = _duplicates(splits)
    warnings = []
    if train_test:
        warnings.append(f"{len(train_test)} image(s) appear in both a training and a test split "
                        f"(e.g. {' = '.join(train_test[0])}); all are listed under "
                        f"duplicates.train_test in {report_path}")
    report.update({
        "counts": counts,
        "images_used": sum(c["used"] for c in counts.values()),
        "images_skipped": len(skipped),
        "skipped": skipped,
        "ignored_files": ignored,
        "source_modes": dict(sorted(modes.items())),
        "duplicates": {"train_test": train_test, "within_splits": within},
        "warnings": warnings,
    })
    return warnings


def _refuse_empty_splits(report: dict, raw: Path, report_path: Path) -> None:
    counts, skipped = report["counts"], report["skipped"]
    empty = [s for s in SPLITS if counts[s]["used"] == 0]
    if empty:
        write_json(report_path, report)
        first = next((x for x in skipped if x["file"].startswith(f"{empty[0]}/")), None)
        why = f"; first: {first['file']}: {first['reason']}" if first else ""
        raise UserError(f"{raw / empty[0]}: no usable images ({counts[empty[0]]['skipped']} skipped{why}); "
                        f"all skipped files are listed in {report_path}")


def _write_arrays(cfg: Config, splits: dict[str, Split], arrays: dict[str, np.memmap], out: Path, raw: Path,
                  name: str, n_skipped: int, preview_path: Path) -> dict:
    """The arrays without their skipped rows, the manifest and the preview; returns the manifest."""
    final = {}
    for s in splits.values():
        keep = [i for i, ok in enumerate(s.ok) if ok]
        arr = arrays.pop(s.name)
        arr.flush()
        final[s.name] = _compact(out / f"{s.name}.npy", arr, keep)
        s.files = [s.files[i] for i in keep]
    split_hashes = {k: {"shape": list(v.shape), "sha256": _array_sha256(v)} for k, v in final.items()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": cfg.data.dataset, "name": name, "source": str(raw),
        "load_size": cfg.data.load_size, "crop_size": cfg.data.crop_size,
        "alpha_background": list(cfg.data.alpha_background),
        "files": {s.name: s.files for s in splits.values()},
        "counts": {k: len(v) for k, v in final.items()},
        "arrays": split_hashes,
        "content_sha256": hashlib.sha256(json.dumps(split_hashes, sort_keys=True).encode()).hexdigest(),
        "skipped": n_skipped,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    write_preview(final["trainA"], final["trainB"], preview_path)
    del final
    return manifest
