"""The embedded dataset `toy_horse2zebra`: a horse2zebra analogue generated from a seed, offline.

Each scene is a landscape (sky, horizon, textured grass) with one or two ellipse "animals".
Domain A renders an animal as a brown body with faint darker bands across its long axis (a horse's
dappled coat); domain B renders the same animal with those bands as black and white stripes (a
zebra). The background is identical in both.

Every body pixel in B is a pointwise function of the same pixel in A (band intensity s ->
brown * (0.7 + 0.3 s) in A, grey 0.08 + 0.85 s in B), so for every test image the translation
into the other domain is fully determined by the input: no free choice such as a stripe phase. Training sets are drawn from independent scenes (unpaired); test
sets come with their exact targets (testA_target, testB_target), which makes a per-pixel error of
the translation meaningful.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

NAME = "toy_horse2zebra"
BROWN = np.array([0.62, 0.38, 0.18])
STRIPES = 3
SUPERSAMPLE = 4


def _noise(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, octaves: int = 3) -> np.ndarray:
    """Smooth texture: a sum of random plane waves, in [-1, 1].

    At most ~12 cycles per image: finer texture would alias at the default 32 px and dominate the
    per-pixel error with detail no small generator can carry through its bottleneck.
    """
    out = np.zeros_like(x)
    for k in range(octaves):
        freq = 2.0 ** k * rng.uniform(1.5, 3)
        theta = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        out += np.cos(freq * (x * np.cos(theta) + y * np.sin(theta)) * 2 * np.pi + phase) / 2 ** k
    return out / 1.75


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene rendered in both domains: (A image, B image), uint8 (size, size, 3)."""
    n = size * SUPERSAMPLE
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    y, x = (y + 0.5) / n, (x + 0.5) / n

    horizon = rng.uniform(0.3, 0.5)
    sky = np.array([0.45, 0.65, 0.9]) + rng.uniform(-0.08, 0.08, 3)
    grass = np.array([0.3, 0.55, 0.2]) + rng.uniform(-0.08, 0.08, 3)
    sky_img = sky * (1.05 - 0.25 * y[..., None] / horizon)
    grass_img = grass * (0.85 + 0.15 * _noise(rng, y, x)[..., None])
    ground = (y > horizon)[..., None]
    background = np.where(ground, grass_img, sky_img)

    img_a, img_b = background.copy(), background.copy()
    for _ in range(rng.integers(1, 3)):
        cx, cy = rng.uniform(0.25, 0.75), rng.uniform(horizon + 0.05, 0.8)
        semi_major = rng.uniform(0.24, 0.36)
        semi_minor = semi_major * rng.uniform(0.5, 0.7)
        angle = rng.uniform(-0.6, 0.6)
        du, dv = x - cx, y - cy
        u = (du * np.cos(angle) + dv * np.sin(angle)) / semi_major
        v = (-du * np.sin(angle) + dv * np.cos(angle)) / semi_minor
        inside = (u ** 2 + v ** 2 <= 1.0)[..., None]
        t = np.clip((u + 1) / 2, 0, 1)[..., None]  # 0 at one end of the body, 1 at the other
        bands = 0.5 + 0.5 * np.cos(2 * np.pi * STRIPES * t)
        horse = BROWN * (0.7 + 0.3 * bands)
        zebra = np.repeat(0.08 + 0.85 * bands, 3, axis=-1)
        img_a = np.where(inside, horse, img_a)
        img_b = np.where(inside, zebra, img_b)

    def finish(img: np.ndarray) -> np.ndarray:
        img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
        return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

    return finish(img_a), finish(img_b)


def generate(out_dir: Path, image_size: int, n_train_a: int, n_train_b: int, n_test: int, seed: int) -> None:
    """Write trainA/ trainB/ testA/ testB/ testA_target/ testB_target/ as PNG files into out_dir.

    Every image comes from its own child seed, so the dataset is the same on every machine and
    a split's size does not change the other splits' images.
    """
    plan = {"trainA": (0, n_train_a), "trainB": (1, n_train_b), "testA": (2, n_test), "testB": (3, n_test)}
    for split, (stream, count) in plan.items():
        folder = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{split}_target" if split.startswith("test") else None
        if target:
            target.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img_a, img_b = render_scene(np.random.default_rng([seed, stream, i]), image_size)
            own, other = (img_a, img_b) if split.endswith("A") else (img_b, img_a)
            Image.fromarray(own).save(folder / f"{i:05d}.png")
            if target:
                Image.fromarray(other).save(target / f"{i:05d}.png")
