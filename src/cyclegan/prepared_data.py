"""Prepared datasets: the on-disk format `prepare` writes and the loaders `train`/`translate` read.

data/prepared/<name>/ holds one uint8 array per split, shape (N, H, W, 3), memory-mapped on read:
  trainA.npy, trainB.npy       resized once to load_size x load_size (training crops from these)
  testA.npy, testB.npy         resized to crop_size x crop_size (the official test-time input)
  testA_target.npy, ...        the known translation of each test image (embedded dataset only)
  manifest.json                source, sizes, file names per split, skipped files, content hash

Training samples are a pure function of (seed, epoch, position): the A permutation, the random B
partner, the crop offsets and the flip. Resuming at a position therefore needs no RNG state from
the loader, and any number of workers or ranks produces the same samples.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import paths
from .datasets.sources import folder_name
from .errors import UserError

SPLITS = ("trainA", "trainB", "testA", "testB")
TARGET_SPLITS = ("testA_target", "testB_target")
MANIFEST = "manifest.json"


@dataclass
class PreparedDataset:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path, splits: tuple[str, ...] = ()) -> PreparedDataset:
        """The prepared data in `root`, with `splits` present; a one-line error naming the file if not."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise UserError(f"{path}: no prepared dataset here; run `dvc repro prepare` (or `dvc repro`) "
                            f"first")
        data = cls(root, json.loads(path.read_text()))
        for split in splits:
            if not data.has(split):
                raise UserError(f"{root / f'{split}.npy'}: missing; run `dvc repro prepare` (or `dvc repro`) "
                                f"again")
        return data

    @classmethod
    def of(cls, dataset: str, splits: tuple[str, ...] = ()) -> PreparedDataset:
        """The prepared data of data.dataset `dataset`, in data/prepared/<name>."""
        return cls.open(paths.PREPARED / folder_name(dataset), splits)

    def array(self, split: str) -> np.ndarray:
        return np.load(self.root / f"{split}.npy", mmap_mode="r")

    def has(self, split: str) -> bool:
        return (self.root / f"{split}.npy").exists()

    def names(self, split: str) -> list[str]:
        return self.manifest["files"][split]


def batch_to_device(images: torch.Tensor, device: torch.device,
                    memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A loader's uint8 (N, 3, H, W) batch as floats in [-1, 1] on `device`.

    uint8 crosses to the device (a quarter of the bytes of float) and is converted there.
    """
    x = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=memory_format)


def epoch_length(n_a: int, n_b: int) -> int:
    return max(n_a, n_b)


class UnpairedTrainSet(Dataset):
    """Item i of epoch e: A image perm_e[i] mod |A|, a random B, each randomly cropped and flipped."""

    def __init__(self, a: np.ndarray, b: np.ndarray, crop_size: int, flip: bool, seed: int):
        self.a, self.b, self.crop, self.flip, self.seed = a, b, crop_size, flip, seed
        self.epoch = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 0])
        return rng.permutation(len(self)) % len(self.a)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._perm = epoch, self._permutation(epoch)

    def __len__(self) -> int:
        return epoch_length(len(self.a), len(self.b))

    def _augment(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape[:2]
        y = int(rng.integers(0, h - self.crop + 1))
        x = int(rng.integers(0, w - self.crop + 1))
        img = img[y:y + self.crop, x:x + self.crop]
        if self.flip and rng.random() < 0.5:
            img = img[:, ::-1]
        return img.copy()  # contiguous, and no longer a view of the read-only memory map

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, 1, i])
        a = self._augment(self.a[self._perm[i]], rng)
        b = self._augment(self.b[int(rng.integers(0, len(self.b)))], rng)
        # uint8 CHW: the float conversion happens on the training device.
        return torch.from_numpy(a).permute(2, 0, 1), torch.from_numpy(b).permute(2, 0, 1)


class PositionSampler(torch.utils.data.Sampler[int]):
    """Positions start..n-1 of the epoch, every `world`-th from `rank`: resumable and shardable."""

    def __init__(self, n: int, start: int = 0, rank: int = 0, world: int = 1):
        self.n, self.start, self.rank, self.world = n, start, rank, world

    def __iter__(self):
        return iter(range(self.start + self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self.n, self.world))
