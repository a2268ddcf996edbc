"""Data throughput: `prepare` on the full horse2zebra, and the training loader at the paper recipe.

    .venv/bin/python benchmarks/data.py [--source ../shared/datasets/horse2zebra] [--items 2000]

1. prepare: decode + convert + BICUBIC resize of all 2661 images (train to 286, test to 256),
   written as memory-mapped arrays, serial and with one worker process per core.
2. loader: cyclegan.prepared_data.UnpairedTrainSet (random 256 crop + flip of the prepared 286 arrays)
   through a torch DataLoader with batch 1, as `train` reads it, for a few worker counts, and
   in-process with one torch thread (collation is torch ops; on a busy CPU extra intra-op
   threads cost far more than they give).

Everything is written to a temporary folder; nothing in the project changes.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "horse2zebra"


def bench_prepare(project: Path, workers: int) -> tuple[float, int]:
    """`cyclegan prepare --workers N` in `project`; returns seconds and images used."""
    from cyclegan.cli import main as cyclegan

    cwd = os.getcwd()
    os.chdir(project)
    try:
        start = time.perf_counter()
        if cyclegan(["prepare", "--workers", str(workers)]) != 0:
            raise SystemExit("cyclegan prepare failed")
        elapsed = time.perf_counter() - start
        report = json.loads(Path("metrics/data_report.json").read_text())
    finally:
        os.chdir(cwd)
    return elapsed, report["images_used"]


def bench_loader(prepared: Path, items: int, num_workers: int, threads: int, seed: int = 0) -> float:
    import torch
    from torch.utils.data import DataLoader

    from cyclegan.prepared_data import PositionSampler, PreparedDataset, UnpairedTrainSet

    ds = PreparedDataset.open(prepared)
    train = UnpairedTrainSet(ds.array("trainA"), ds.array("trainB"), crop_size=256, flip=True, seed=seed)
    n = min(items, len(train))
    loader = DataLoader(train, batch_size=1, sampler=PositionSampler(n), num_workers=num_workers,
                        persistent_workers=False)
    default_threads = torch.get_num_threads()
    # Batch collation runs torch ops in this process: their intra-op thread count matters.
    torch.set_num_threads(threads or default_threads)
    start = time.perf_counter()
    seen = 0
    # The loader delivers uint8; the float conversion happens on the training device, not here.
    for a, b in loader:
        assert a.shape == b.shape == (1, 3, 256, 256)
        seen += a.shape[0]
    rate = seen / (time.perf_counter() - start)
    torch.set_num_threads(default_threads)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="an extracted horse2zebra folder")
    parser.add_argument("--items", type=int, default=1334, help="loader samples to time (one epoch: 1334)")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    if not (args.source / "trainA").is_dir():
        raise SystemExit(f"{args.source}: no horse2zebra there; pass --source")

    # Heavy imports stay inside main(): prepare's worker processes re-import this script.
    from cyclegan.datasets.folder import copy_images

    cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="cyclegan-bench-") as tmp:
        project = Path(tmp)
        (project / "params.yaml").write_text(
            "data:\n  dataset: horse2zebra\n  load_size: 286\n  crop_size: 256\n")
        copy_images(args.source, project / "data" / "raw" / "horse2zebra")
        for workers in (1, 0):
            elapsed, n = bench_prepare(project, workers)
            how = "1 process" if workers == 1 else f"auto processes ({cores} cores)"
            rows.append((f"prepare 286/256, {how}", f"{n} images",
                         f"{n / elapsed:.1f} images/s", f"{elapsed:.1f} s"))
        prepared = project / "data" / "prepared" / "horse2zebra"
        for w, threads in [(w, 0) for w in args.loader_workers] + [(0, 1)]:
            rate = bench_loader(prepared, args.items, w, threads)
            what = f"train loader, batch 1, num_workers={w}" + (f", torch threads={threads}" if threads else "")
            rows.append((what, f"{args.items} A+B pairs", f"{rate:.1f} pairs/s", f"{args.items / rate:.1f} s"))

    print(f"\nhorse2zebra data throughput ({cores} CPU cores)")
    header = ("what", "work", "throughput", "time")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


if __name__ == "__main__":
    main()
