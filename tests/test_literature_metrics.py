"""clean-FID against the clean-fid library itself, and precision/recall on constructed cases.

Real horse2zebra test images from ../shared, shrunk to 48 px (clean-fid and torch-fidelity both
resize to 299 for the network, so the network's cost per image is the same at any size). The
Inception weights are the project's offline ones (the session cache of conftest.inception_cache).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cyclegan import inception, literature_metrics as lm
from cyclegan.errors import UserError
from cyclegan.fid_kid import InceptionScorer, frechet_distance

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "horse2zebra"
SIZE = 48


def shared_images(split: str, n: int) -> np.ndarray:
    files = sorted((SHARED / split).glob("*.jpg"))[:n]
    if len(files) < n:
        pytest.skip(f"{SHARED / split}: the shared horse2zebra test set is not here")
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)) for f in files])


def write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")  # lossless: the folder holds the array
    return folder


@pytest.fixture(scope="module")
def scorer(inception_cache) -> InceptionScorer:
    return InceptionScorer(inception.resolve("auto"), "cpu", batch_size=8)


@pytest.mark.slow
def test_our_clean_fid_equals_cleanfid_compute_fid_and_legacy_is_torch_fidelity(scorer, tmp_path):
    import cleanfid.fid

    horses, zebras = shared_images("testA", 6), shared_images("testB", 6)
    folders = write_folder(tmp_path / "horses", horses), write_folder(tmp_path / "zebras", zebras)

    ours = frechet_distance(lm.clean_features(scorer, horses, cache=False), lm.clean_features(scorer, zebras, cache=False))
    # clean-fid's own pipeline end to end: its folder reading, its clean resize, its scipy sqrtm
    # Frechet distance; only the network is ours (its own download is unreachable here).
    theirs = cleanfid.fid.compute_fid(str(folders[0]), str(folders[1]), mode="clean",
                                      custom_feat_extractor=lm.cleanfid_extractor(scorer, lm.CLEAN_MODE),
                                      device=torch.device("cpu"), num_workers=0, batch_size=8, verbose=False)
    # rel 1e-5: the features are the same; the distances differ in the matrix square root (scipy's
    # sqrtm of the rank-deficient 2048 x 2048 product against our exact nuclear norm) and float32
    # means; measured 1.6e-7 relative.
    assert ours == pytest.approx(theirs, rel=1e-5)

    # Legacy mode: clean-fid reads and hands over the pixels unresized; with our extractor the
    # network is torch-fidelity's forward, so its features are the project's fid_* features.
    legacy = {name: cleanfid.fid.get_folder_features(str(folder), lm.cleanfid_extractor(scorer, lm.LEGACY_MODE),
                                                     num_workers=0, batch_size=8, device=torch.device("cpu"),
                                                     mode=lm.LEGACY_MODE, verbose=False)
              for name, folder in zip(("horses", "zebras"), folders)}
    fidelity = {"horses": scorer.features(horses, cache=False), "zebras": scorer.features(zebras, cache=False)}
    for name in legacy:
        np.testing.assert_allclose(legacy[name], fidelity[name], rtol=0, atol=1e-5)
    legacy_fid = frechet_distance(legacy["horses"], legacy["zebras"])
    # Measured 2.9e-7 relative with clean-fid's compute_fid (scipy sqrtm) in legacy mode.
    assert legacy_fid == pytest.approx(frechet_distance(fidelity["horses"], fidelity["zebras"]), rel=1e-5)
    # The resize is what clean-FID is about: the two modes must not agree (here ~14 points apart).
    assert abs(ours - legacy_fid) > 1.0


def test_clean_mode_network_is_torch_fidelity_s_at_299(scorer):
    """At 299 px torch-fidelity's resize is the identity, so our float path must give its features."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 299, 299), dtype=np.uint8))
    net = scorer.extractor()
    with torch.no_grad():
        expected = net(images)[0]
        got = lm.inception_pool(net, images.float())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="299x299"):
        lm.inception_pool(net, torch.zeros(1, 3, 64, 64))


def test_clean_features_are_cached_by_content(scorer):
    horses = shared_images("testA", 2)
    before = scorer.images_extracted
    first = lm.clean_features(scorer, horses, cache=True)
    again = lm.clean_features(scorer, horses, cache=True)
    assert scorer.images_extracted - before == 2  # the second call read the cache
    np.testing.assert_array_equal(first, again)
    other = lm.clean_features(scorer, horses[::-1].copy(), cache=True)
    assert scorer.images_extracted - before == 4  # other content, other cache entry
    np.testing.assert_allclose(other, first[::-1], atol=1e-5)


def test_precision_recall_of_constructed_cases(scorer):
    real = scorer.features(shared_images("testA", 8), cache=True)
    itself = lm.precision_recall(real.copy(), real)
    assert itself == {"precision": 1.0, "recall": 1.0}
    # Mode collapse: five copies of one real image. Each copy sits on a real image (precision 1),
    # but the copies' k-NN balls have radius 0 and cover at most that one real image.
    collapsed = lm.precision_recall(np.repeat(real[:1], 5, axis=0), real)
    assert collapsed["precision"] == 1.0
    assert collapsed["recall"] <= 1 / 8
    with pytest.raises(UserError, match="k = 3 needs more than 3 images"):
        lm.precision_recall(real[:3], real)


@pytest.mark.slow
def test_tiny_test_sets_get_clean_fid_but_no_precision_recall(scorer):
    """Three images a side: FID/KID worked before precision/recall existed, so evaluate must not fail."""
    rng = np.random.default_rng(3)
    images = {k: rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8) for k in ("A2B", "B2A", "A", "B")}
    pool = {k: rng.normal(size=(3, 2048)).astype(np.float32) for k in images}  # only their count matters here
    metrics, protocol = lm.literature_scores(scorer, images, pool, cache_reals=False)
    assert sorted(metrics) == ["cleanfid_A2B", "cleanfid_B2A", "cleanfid_baseline"]
    assert protocol["prc_not_computed"].startswith("A2B, B2A, baseline: precision/recall need more than k = 3")
