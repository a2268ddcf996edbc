"""`cyclegan translate`: every testA image to B and every testB image to A, as PNG.

As a stage it writes data/translated/A2B/<name>.png and data/translated/B2A/<name>.png at the
official test-time preprocessing (resized to crop_size, no crop or flip), or with
eval.full_resolution at each image's own size, sides rounded to the multiple the generator's
architecture needs (4 for the ResNets, 256 for unet_256).

With --input it translates the images of any folder with a given generator file, decoded as
`prepare` decodes (EXIF, modes, alpha over data.alpha_background). Files that cannot be used are
skipped and listed in <output>/translate_report.json, or stop it (data.on_bad_image). Each
<name>.<ext> becomes <output>/<name>.png; the output folder is written whole, atomically.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import images, paths
from ..config import Config
from ..datasets.sources import folder_name
from ..prepared_data import PreparedDataset
from ..device import exact_fp32, resolve_device
from ..errors import UserError
from ..fileio import atomic_dir, write_json
from ..generator_file import open_generator, translate_array
from ..networks import size_multiple
from ..vocabulary import DIRECTIONS, TEST_SPLITS

# In an --output folder: what was translated and what was skipped, and the sign that the folder
# is one this command wrote (and may replace).
REPORT = "translate_report.json"


def add_arguments(parser) -> None:
    parser.add_argument("--input", type=Path, help="a folder of images to translate (instead of the test "
                                                   "sets)")
    parser.add_argument("--generator", type=Path, default=paths.GENERATORS["G_A"],
                        help="generator file for --input (models/G_A.safetensors: A->B, "
                             "models/G_B.safetensors: "
                             "B->A; .pt files of cyclegan <= 0.1 are still read)")
    parser.add_argument("--output", type=Path,
                        help="output folder for --input (default: <input>_translated); replaced whole")


def _round_to_multiple(image: Image.Image, multiple: int) -> Image.Image:
    """The image resized so that both sides are the nearest multiples of `multiple` (at least one)."""
    w, h = (max(multiple, int(round(s / multiple)) * multiple) for s in image.size)
    return image if (w, h) == image.size else image.resize((w, h), Image.BICUBIC)


@torch.no_grad()
def translate_files(net: torch.nn.Module, files: list[Path], out_dir: Path, size: int | None,
                    device: torch.device, desc: str, background: tuple[int, int, int],
                    bad: Callable[[Path, str], None] | None = None, multiple: int = 4) -> int:
    """One image at a time, so images of different sizes can pass at full resolution; returns the count.

    size None: each image at its own size, its sides rounded to multiples of `multiple` (what the
    generator's architecture needs to return that size).

    Decoded as `prepare` decodes (EXIF, modes, alpha), so inputs look like the training data. A file
    that cannot be used goes to `bad(file, reason)` when given, else stops with one line.
    """
    done = 0
    for f in tqdm(files, desc=desc, unit="img", disable=None):
        try:
            image = images.open_rgb(f, background=background)
        except images.BadImage as e:
            if bad is None:
                raise UserError(f"{f}: {e}; remove or replace it") from None
            bad(f, str(e))
            continue
        image = image.resize((size, size), Image.BICUBIC) if size else _round_to_multiple(image, multiple)
        fake = translate_array(net, np.asarray(image)[None], 1, device)[0]
        Image.fromarray(fake).save(out_dir / paths.translated_name(f.name))
        done += 1
    return done


def _check_unique_outputs(names: list[str], folder: Path) -> None:
    """Each image gets its own output file: a.jpg and a.png would both become a.png."""
    seen: dict[str, str] = {}
    for n in names:
        out = paths.translated_name(n)
        if out in seen:
            raise UserError(f"{folder / seen[out]} and {folder / n}: both would be translated to {out}; "
                            f"rename one of them in your dataset folder and run `dvc repro` again")
        seen[out] = n


def translate_test_sets(cfg: Config, device: torch.device) -> None:
    name = folder_name(cfg.data.dataset)
    data = PreparedDataset.of(cfg.data.dataset, ("testA", "testB"))
    for split in TEST_SPLITS:
        _check_unique_outputs(data.names(split), paths.RAW / name / split)
    with atomic_dir(paths.TRANSLATED) as out:
        for direction in DIRECTIONS:
            architecture, _, net = open_generator(paths.GENERATORS[direction.generator], device)
            folder, split = out / direction.name, direction.source
            folder.mkdir()
            if cfg.eval.full_resolution:
                raw = paths.RAW / name / split
                translate_files(net, [raw / f for f in data.names(split)], folder, None, device,
                                direction.name,
                                cfg.data.alpha_background, multiple=size_multiple(architecture.netG))
                continue
            fakes = translate_array(net, np.asarray(data.array(split)), cfg.eval.batch_size, device)
            for fname, fake in zip(tqdm(data.names(split), desc=direction.name, unit="img", disable=None),
                                   fakes):
                Image.fromarray(fake).save(folder / paths.translated_name(fname))


def main(cfg: Config, args=None) -> None:
    device = resolve_device(cfg.eval.device, "eval.device")
    with exact_fp32():  # no TF32 on GPUs: translations as close to the CPU's as the device allows
        _translate(cfg, device, args)


def _translate(cfg: Config, device: torch.device, args) -> None:
    if args is None or args.input is None:
        translate_test_sets(cfg, device)
        return
    translate_folder(cfg, device, args.input, args.generator, args.output)


def _check_output(source: Path, output: Path) -> None:
    """The output folder is replaced whole: never one that holds the input or files not ours."""
    if source.resolve() == output.resolve() or source.resolve().is_relative_to(output.resolve()):
        raise UserError(f"--output {output}: holds the input folder {source}, and the output folder is "
                        f"replaced "
                        f"whole; choose another --output")
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise UserError(f"--output {output}: exists and is not a folder; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not (output / REPORT).is_file():
        raise UserError(f"--output {output}: holds files that `cyclegan translate` did not write, and the "
                        f"output "
                        f"folder is replaced whole; choose a new or empty folder")


def translate_folder(cfg: Config, device: torch.device, source: Path, generator: Path,
                     output: Path | None) -> dict:
    """Translate the images directly in `source` into `output`; returns what REPORT holds."""
    policy = cfg.data.on_bad_image
    looked_for = ", ".join(images.IMG_EXTENSIONS)
    if not source.is_dir():
        raise UserError(f"--input {source}: not a folder")
    output = output or source.with_name(f"{source.name}_translated")
    _check_output(source, output)
    entries = sorted(e for e in os.listdir(source) if not e.startswith("."))
    if not entries:
        raise UserError(f"--input {source}: the folder is empty; put the images to translate there "
                        f"({looked_for})")
    names = [e for e in entries if images.is_image_name(e)]
    if not names:
        raise UserError(f"--input {source}: no images among its {len(entries)} entries (looked for "
                        f"{looked_for})")

    skipped: list[dict[str, str]] = []

    def bad(name: str, reason: str) -> None:
        if policy == "fail":
            raise UserError(f"{source / name}: {reason}; fix or remove it, or set data.on_bad_image: skip "
                            f"in params.yaml")
        skipped.append({"file": name, "reason": reason})
        print(f"cyclegan translate: skipped {source / name}: {reason}", file=sys.stderr)

    # Checked before any compute: entries without content, and names whose outputs would collide.
    todo: list[str] = []
    owner: dict[str, str] = {}
    for name in names:
        problem = images.entry_problem(source / name)
        out = paths.translated_name(name)
        if problem is None and out in owner:
            problem = f"its translation would be {out}, as that of {owner[out]}; rename one of them"
        if problem:
            bad(name, problem)
        else:
            owner[out] = name
            todo.append(name)

    architecture, _, net = open_generator(generator, device)
    size = None if cfg.eval.full_resolution else cfg.data.crop_size
    with atomic_dir(output) as out_dir:
        n = translate_files(net, [source / name for name in todo], out_dir, size, device, "translate",
                            cfg.data.alpha_background, lambda f, reason: bad(f.name, reason),
                            multiple=size_multiple(architecture.netG))
        if not n:
            first = skipped[0]
            raise UserError(f"--input {source}: no usable images ({len(skipped)} skipped, first "
                            f"{first['file']}: "
                            f"{first['reason']})")
        failed = {x["file"] for x in skipped}
        report = {"input": str(source), "generator": str(generator), "on_bad_image": policy,
                  "translated": {name: paths.translated_name(name) for name in todo if name not in failed},
                  "skipped": sorted(skipped, key=lambda x: x["file"])}
        write_json(out_dir / REPORT, report)
    listed = f" ({len(skipped)} skipped, listed in {output / REPORT})" if skipped else ""
    print(f"cyclegan translate: {n} images -> {output}{listed}")
    return report
