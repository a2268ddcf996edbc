"""Pictures the stages draw: the sample grid of a pair of generators, and matplotlib figures.

The sample grid is the same in the MLflow run (every epoch, from train) and in the report: one
column per test image, rows as SAMPLE_ROWS.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the grid alone: `cyclegan compare` draws without it
    import numpy as np
    import torch
    from PIL import Image

# x, G(x), F(G(x)) and F(x) for a forward generator G and its backward F. F(x) is the identity
# mapping the identity loss trains: the generator into x's own domain should leave x unchanged.
SAMPLE_ROWS = ("input", "translation", "reconstruction", "identity")


def sample_grid(images: np.ndarray, forward: torch.nn.Module, backward: torch.nn.Module,
                device: torch.device) -> Image.Image:
    """The grid of uint8 (N, H, W, 3) `images` through `forward` and `backward`, as in SAMPLE_ROWS.

    The networks are called as they are: the caller puts them in eval mode.
    """
    import torch
    import torchvision

    from .image_tensors import to_tensor

    with torch.no_grad():
        real = to_tensor(images).to(device)
        fake = forward(real)
        rows = [real, fake, backward(fake), backward(real)]
    grid = torchvision.utils.make_grid(torch.cat(rows).float().cpu(), nrow=len(images), padding=2,
                                       normalize=True, value_range=(-1, 1), pad_value=1.0)
    return torchvision.transforms.functional.to_pil_image(grid)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pyplot():
    """matplotlib.pyplot on the Agg backend: stages run headless, in CI and in queued experiments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    pyplot().close(fig)
    return buf.getvalue()
