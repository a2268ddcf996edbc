"""The training samples (cyclegan.data.UnpairedTrainSet): random flips as the authors apply them."""
from __future__ import annotations

import numpy as np

from cyclegan.data import PositionSampler, UnpairedTrainSet

SIZE, N = 8, 400


def half_bright(n: int) -> np.ndarray:
    """n images whose right half is white: flipped, the left half is."""
    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    images[:, :, SIZE // 2:] = 255
    return images


def flips(dataset: UnpairedTrainSet) -> tuple[list[bool], list[bool]]:
    """Which A and which B samples of the epoch came out flipped."""
    items = [dataset[i] for i in range(len(dataset))]
    return [bool(a[0, 0, 0] > 127) for a, _ in items], [bool(b[0, 0, 0] > 127) for _, b in items]


def test_half_the_samples_are_flipped_independently_and_the_same_for_the_same_position():
    dataset = UnpairedTrainSet(half_bright(N), half_bright(N), SIZE, flip=True, seed=3)
    a, b = flips(dataset)
    # 400 fair coins: 0.5 +- 0.025 (one standard deviation); the bounds are 4 of them.
    assert 0.4 < np.mean(a) < 0.6 and 0.4 < np.mean(b) < 0.6
    assert 0.4 < np.mean(np.array(a) == np.array(b)) < 0.6  # A's and B's flips are drawn apart
    again = UnpairedTrainSet(half_bright(N), half_bright(N), SIZE, flip=True, seed=3)
    assert flips(again) == (a, b)  # a pure function of (seed, epoch, position): resumable
    again.set_epoch(1)
    assert flips(again)[0] != a  # another epoch, other flips
    other_seed = UnpairedTrainSet(half_bright(N), half_bright(N), SIZE, flip=True, seed=4)
    assert flips(other_seed)[0] != a


def test_no_flip_means_no_flips():
    dataset = UnpairedTrainSet(half_bright(N), half_bright(N), SIZE, flip=False, seed=3)
    a, b = flips(dataset)
    assert not any(a) and not any(b)


def test_position_sampler_takes_every_world_th_position_from_the_start():
    assert list(PositionSampler(5)) == [0, 1, 2, 3, 4] and len(PositionSampler(5)) == 5  # one process, from 0
    assert list(PositionSampler(10, start=4, rank=1, world=2)) == [5, 7, 9]  # resumed mid-epoch, rank 1 of 2
    assert list(PositionSampler(10, start=4, rank=0, world=2)) == [4, 6, 8]
