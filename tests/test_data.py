"""The training samples (cyclegan.prepared_data.UnpairedTrainSet): random flips as the authors apply them."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from cyclegan.image_tensors import to_tensor, to_uint8
from cyclegan.prepared_data import PositionSampler, UnpairedTrainSet

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


def labelled(n: int) -> np.ndarray:
    """n flat images, image k filled with the value k: any crop or flip of it still says k."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, SIZE, SIZE, 3)).copy()


def drawn(dataset: UnpairedTrainSet) -> tuple[list[int], list[int]]:
    """Which A image and which B partner each position of the epoch holds."""
    items = [dataset[i] for i in range(len(dataset))]
    return [int(a[0, 0, 0]) for a, _ in items], [int(b[0, 0, 0]) for _, b in items]


def test_each_epoch_visits_every_a_image_once_with_random_partners_from_all_of_b():
    # |A| < |B|: an epoch is |B| long, so A comes round again (the authors' index % |A|).
    n_a, n_b = 5, 12
    dataset = UnpairedTrainSet(labelled(n_a), labelled(n_b), SIZE, flip=True, seed=0)
    partners = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        a, b = drawn(dataset)
        assert len(a) == n_b and sorted(set(a)) == list(range(n_a))
        partners.update(b)
    assert partners == set(range(n_b))  # 96 draws: every B image, the first and the last too


def test_an_epochs_samples_depend_on_the_epoch_alone_not_on_the_epochs_before():
    # A resumed run opens the dataset at its epoch directly; an uninterrupted one got there epoch
    # by epoch. Both must draw the same samples, and consecutive epochs other orders.
    a, b = labelled(20), labelled(7)
    walked = UnpairedTrainSet(a, b, SIZE, flip=True, seed=5)
    orders = []
    for epoch in range(3):
        walked.set_epoch(epoch)
        orders.append(drawn(walked))
        fresh = UnpairedTrainSet(a, b, SIZE, flip=True, seed=5)
        fresh.set_epoch(epoch)
        assert drawn(fresh) == orders[-1]
    walked.set_epoch(0)
    assert drawn(walked) == orders[0] == drawn(UnpairedTrainSet(a, b, SIZE, flip=True, seed=5))
    assert orders[0][0] != orders[1][0] != orders[2][0]


def test_to_tensor_reads_a_read_only_memory_map_without_aliasing_it(tmp_path):
    # Prepared splits are opened as read-only memory maps; torch must get a copy, not a view it
    # warns about (and could write through).
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.save(tmp_path / "split.npy", images)
    mapped = np.load(tmp_path / "split.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = to_tensor(mapped)
    expected = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)


def test_to_uint8_inverts_to_tensor_and_clamps_what_leaves_the_range():
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    assert np.array_equal(to_uint8(to_tensor(every_value)), every_value)
    # A generator's tanh stays in [-1, 1]; anything past it saturates instead of wrapping around.
    x = torch.tensor([-3.0, -1.5, -1.0, 0.0, 1.0, 1.5, 3.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 0, 128, 255, 255, 255]
