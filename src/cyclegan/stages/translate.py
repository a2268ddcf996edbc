"""`cyclegan translate`: every testA image to B and every testB image to A, as PNG.

As a stage it writes data/translated/A2B/<name>.png and data/translated/B2A/<name>.png at the
official test-time preprocessing (resized to crop_size, no crop or flip), or with
eval.full_resolution at each image's own size, sides rounded to multiples of 4.
With --input it translates any folder of your images with a given generator file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import images, paths
from ..config import Config
from ..data import PreparedDataset, dataset_name
from ..device import exact_fp32, resolve_device
from ..errors import UserError
from ..fileio import atomic_dir
from ..generators import load_generator, translate_array


def add_arguments(parser) -> None:
    parser.add_argument("--input", type=Path, help="a folder of images to translate (instead of the test sets)")
    parser.add_argument("--generator", type=Path, default=paths.GENERATORS["G_A"],
                        help="generator file for --input (models/G_A.safetensors: A->B, models/G_B.safetensors: "
                             "B->A; .pt files of cyclegan <= 0.1 are still read)")
    parser.add_argument("--output", type=Path, help="output folder for --input")


def _open_rgb(path: Path, background: tuple[int, int, int]) -> Image.Image:
    # The same decoding as `prepare` (EXIF, modes, alpha), so inputs look like the training data.
    try:
        return images.open_rgb(path, background=background)
    except images.BadImage as e:
        raise UserError(f"{path}: {e}; remove or replace it") from None


def _multiple_of_4(image: Image.Image) -> Image.Image:
    w, h = (max(4, int(round(s / 4)) * 4) for s in image.size)
    return image if (w, h) == image.size else image.resize((w, h), Image.BICUBIC)


@torch.no_grad()
def translate_files(net: torch.nn.Module, files: list[Path], out_dir: Path, size: int | None,
                    device: torch.device, desc: str, background: tuple[int, int, int]) -> None:
    """One image at a time, so images of different sizes can pass at full resolution."""
    for f in tqdm(files, desc=desc, unit="img", disable=None):
        image = _open_rgb(f, background)
        image = image.resize((size, size), Image.BICUBIC) if size else _multiple_of_4(image)
        fake = translate_array(net, np.asarray(image)[None], 1, device)[0]
        Image.fromarray(fake).save(out_dir / paths.translated_name(f.name))


def translate_test_sets(cfg: Config, device: torch.device) -> None:
    name = dataset_name(cfg.data.dataset)
    data = PreparedDataset.of(cfg.data.dataset, ("testA", "testB"))
    with atomic_dir(paths.TRANSLATED) as out:
        for direction, split, gen in (("A2B", "testA", "G_A"), ("B2A", "testB", "G_B")):
            net = load_generator(paths.GENERATORS[gen], device)
            (out / direction).mkdir()
            if cfg.eval.full_resolution:
                raw = paths.RAW / name / split
                translate_files(net, [raw / f for f in data.names(split)], out / direction, None, device, direction,
                                cfg.data.alpha_background)
                continue
            fakes = translate_array(net, np.asarray(data.array(split)), cfg.eval.batch_size, device)
            for fname, fake in zip(tqdm(data.names(split), desc=direction, unit="img", disable=None), fakes):
                Image.fromarray(fake).save(out / direction / paths.translated_name(fname))


def main(cfg: Config, args=None) -> None:
    device = resolve_device(cfg.eval.device, "eval.device")
    with exact_fp32():  # no TF32 on GPUs: translations as close to the CPU's as the device allows
        _translate(cfg, device, args)


def _translate(cfg: Config, device: torch.device, args) -> None:
    if args is None or args.input is None:
        translate_test_sets(cfg, device)
        return
    if not args.input.is_dir():
        raise UserError(f"--input {args.input}: not a folder")
    files = sorted(p for p in args.input.iterdir() if p.is_file() and images.is_image_name(p.name))
    if not files:
        raise UserError(f"--input {args.input}: no images ({', '.join(images.IMG_EXTENSIONS)})")
    output = args.output or args.input.with_name(f"{args.input.name}_translated")
    net = load_generator(args.generator, device)
    size = None if cfg.eval.full_resolution else cfg.data.crop_size
    with atomic_dir(output) as out:
        translate_files(net, files, out, size, device, "translate", cfg.data.alpha_background)
    print(f"cyclegan translate: {len(files)} images -> {output}")
