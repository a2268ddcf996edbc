"""Scores to set beside published ones: clean-FID (the clean-fid library) and precision/recall.

clean-FID (Parmar et al. 2022, PyPI clean-fid) differs from the FID that torch-fidelity computes
only in how an image reaches the Inception network's 299x299 input. clean-fid takes a custom
feature extractor, and we give it the same 2015-12-05 network `cyclegan.inception` resolves
offline (clean-fid's own download is unreachable behind a firewall), in two of its modes:

  clean              clean-fid resizes outside the network with PIL's antialiased bicubic on
                     float32 channels, no quantisation back to uint8; the network then sees the
                     299x299 float image ((x - 128) / 128, as torch-fidelity normalises).
  legacy_tensorflow  no resize outside; the network resizes inside. With our extractor that is
                     torch-fidelity's own forward (TF1-compatible bilinear resize), so the legacy
                     clean-FID IS the project's fid_<direction>: the same features and the same
                     Frechet distance, up to how the matrix square root is taken (see the tests).
                     clean-fid's third mode, legacy_pytorch, is pytorch-fid's network and resize,
                     neither of which the project uses.

So the evaluate stage runs one extra Inception pass per image set, for the clean mode (real test
sets' clean features are cached by content like torch-fidelity's), and reuses the torch-fidelity
features for the legacy figure (= fid_*) and for precision/recall. The Frechet distance is
`fid_kid.frechet_distance` (exact; clean-fid's scipy sqrtm of a 2048x2048 product takes seconds
each and is the less accurate of the two where covariances are rank-deficient).

Precision and recall (Kynkaanniemi et al. 2019) are torch-fidelity's, on the 2048-d pool features:
precision, the share of translations inside the real set's k-nearest-neighbour balls (are they
realistic?); recall, the share of real images inside the translations' balls (do they cover the
variety?). A generator that draws a few convincing zebras for every horse has high precision and
low recall.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError
from .fileio import atomic_path
from .vocabulary import CLEANFID, FID, PRECISION, RECALL, metric

if TYPE_CHECKING:  # torch and the Inception code load only to compute: the report and
    import torch   # `cyclegan compare` import the names and references below without them

    from .fid_kid import InceptionScorer

CLEAN_MODE = "clean"
LEGACY_MODE = "legacy_tensorflow"
PRC_NEIGHBORHOOD = 3  # k of the k-NN balls: Kynkaanniemi et al.'s choice and torch-fidelity's default
INCEPTION_SIZE = 299

# How each of vocabulary.LITERATURE is computed (named like fid_*: cleanfid_A2B, ..._baseline);
# eval_details.json records these beside the numbers. Why none is in metrics/eval.json:
# vocabulary.HEADLINE.
METRICS = {
    CLEANFID: (f"clean-FID, clean-fid mode '{CLEAN_MODE}': PIL bicubic resize to {INCEPTION_SIZE}x"
               f"{INCEPTION_SIZE} on float32, no quantisation; Inception 2015-12-05 pool features (2048)"),
    PRECISION: (f"improved precision (Kynkaanniemi et al. 2019), torch-fidelity prc, k = {PRC_NEIGHBORHOOD}, "
                "on the 2048-d pool features of fid_*: share of translations inside the real k-NN balls"),
    RECALL: (f"improved recall (Kynkaanniemi et al. 2019), torch-fidelity prc, k = {PRC_NEIGHBORHOOD}, "
             "on the 2048-d pool features of fid_*: share of real images inside the translations' "
             "k-NN balls"),
}
# The legacy clean-FID is not stored twice: it is fid_<direction>.
LEGACY_IS = FID

# Published horse2zebra FIDs (testA translated, against testB) and which of ours each compares with.
PUBLISHED = (
    {"source": "clean-fid leaderboard (GaParmar/clean-fid README, Horse2Zebra)", "model": "CycleGAN",
     "legacy_fid": 77.2, "clean_fid": 75.17,
     "protocol": ("all 140 testB images vs the 120 translated testA images at 256 px; "
                  "legacy = legacy_tensorflow"),
     "compare_with": "fid_A2B (legacy) and cleanfid_A2B, with data.crop_size 256 on horse2zebra"},
    {"source": "clean-fid leaderboard (GaParmar/clean-fid README, Horse2Zebra)", "model": "CUT",
     "legacy_fid": 45.5, "clean_fid": 43.71,
     "protocol": "as above", "compare_with": "fid_A2B and cleanfid_A2B (a stronger model than CycleGAN)"},
    {"source": "MMagic model zoo (CycleGAN horse2zebra)", "model": "CycleGAN (official generator)",
     "legacy_fid": 62.1, "clean_fid": None,
     "protocol": "MMagic's own test pipeline and FID code",
     "compare_with": "none exactly; nearest is fid_A2B, a different protocol"},
)


def cleanfid_version() -> str:
    return importlib.metadata.version("clean-fid")  # the package has no __version__


def inception_pool(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pool features of (N, 3, 299, 299) float images in [0, 255] through torch-fidelity's network.

    torch-fidelity's forward accepts uint8 only and resizes itself; clean mode has already resized
    to float, so its layers are run here in forward's order, after the same normalisation.
    """
    import torch

    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        raise ValueError(f"clean-mode input must be {INCEPTION_SIZE}x{INCEPTION_SIZE}, got {tuple(x.shape)}")
    x = (x.to(net.feature_extractor_internal_dtype) - 128) / 128
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                 "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"):
        x = getattr(net, name)(x)
    return torch.flatten(x, 1).to(torch.float32)


def cleanfid_extractor(scorer: InceptionScorer, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """clean-fid's `custom_feat_extractor` for `mode`: our Inception, fed as clean-fid feeds its own."""
    import torch

    net = scorer.extractor()

    def clean(batch: torch.Tensor) -> torch.Tensor:
        return inception_pool(net, batch)

    def legacy(batch: torch.Tensor) -> torch.Tensor:
        # clean-fid hands over the unresized pixels as float; they are whole numbers, so uint8 is exact.
        return net(batch.round().clamp(0, 255).to(torch.uint8))[0]

    def run(fn):
        def extract(batch: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return fn(batch.to(scorer.device))
        return extract

    if mode == CLEAN_MODE:
        return run(clean)
    if mode == LEGACY_MODE:
        return run(legacy)
    raise ValueError(f"clean-fid mode {mode!r}: only {CLEAN_MODE!r} and {LEGACY_MODE!r} use this "
                     "project's network")


def clean_resize(image: np.ndarray) -> np.ndarray:
    """A uint8 (H, W, 3) image as clean-fid's clean mode resizes it: float32 (299, 299, 3) in [0, 255]."""
    from cleanfid.resize import build_resizer

    return build_resizer(CLEAN_MODE)(image)


def clean_features(scorer: InceptionScorer, images: np.ndarray, cache: bool) -> np.ndarray:
    """(N, 2048) clean-mode features of uint8 (N, H, W, 3) images; cached by content if `cache`."""
    import torch

    path = None
    if cache:
        key = hashlib.sha256(
            f"{scorer.cache_name(images)}|clean-fid {cleanfid_version()}|{CLEAN_MODE}".encode())
        path = scorer.cache_root / f"cyclegan-cleanfid-{key.hexdigest()[:32]}.npy"
        if path.is_file():
            try:
                feats = np.load(path)
                if feats.shape == (len(images), 2048):
                    return feats
            except (OSError, ValueError):
                pass  # an unreadable cache file is recomputed and replaced
    extract = cleanfid_extractor(scorer, CLEAN_MODE)
    from .device import exact_fp32

    out = []
    with exact_fp32():
        for start in range(0, len(images), scorer.batch_size):
            batch = np.stack([clean_resize(im) for im in images[start:start + scorer.batch_size]])
            out.append(extract(torch.from_numpy(batch).permute(0, 3, 1, 2)).cpu().numpy())
            scorer.images_extracted += len(batch)
    feats = np.concatenate(out) if out else np.empty((0, 2048), np.float32)
    if path is not None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, feats)
    return feats


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = PRC_NEIGHBORHOOD) -> dict[str, float]:
    """torch-fidelity's precision and recall of `fake` features against `real` features."""
    import torch
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    if min(len(fake), len(real)) <= k:
        raise UserError(f"precision/recall with k = {k} needs more than {k} images on each side, "
                        f"got {len(fake)} and {len(real)}")
    out = prc_features_to_metric(torch.from_numpy(np.ascontiguousarray(fake)),
                                 torch.from_numpy(np.ascontiguousarray(real)),
                                 prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return {PRECISION: out[KEY_METRIC_PRECISION], RECALL: out[KEY_METRIC_RECALL]}


def literature_scores(scorer: InceptionScorer, images: dict[str, np.ndarray],
                      pool_features: dict[str, np.ndarray],
                      cache_reals: bool = True) -> tuple[dict[str, float], dict]:
    """clean-FID, precision and recall of every pair in fid_kid.TRANSLATION_PAIRS, and their protocol.

    `images` and `pool_features` (the torch-fidelity features fid_* came from) are keyed A2B, B2A,
    A, B. Returns cleanfid_<pair>, precision_<pair>, recall_<pair>.
    """
    from .fid_kid import TRANSLATION_PAIRS, frechet_distance

    clean = {k: clean_features(scorer, v, cache=cache_reals and k in ("A", "B")) for k, v in images.items()}
    metrics: dict[str, float] = {}
    too_small = []  # a test set of 2 or 3 images still gets FID/KID, as before precision/recall
    for name, (x, y) in TRANSLATION_PAIRS.items():
        metrics[metric(CLEANFID, name)] = frechet_distance(clean[x], clean[y])
        if min(len(pool_features[x]), len(pool_features[y])) <= PRC_NEIGHBORHOOD:
            too_small.append(name)
            continue
        for kind, value in precision_recall(pool_features[x], pool_features[y]).items():
            metrics[metric(kind, name)] = value
    protocol = {
        "implementation": (f"clean-fid {cleanfid_version()} (resize, modes) with this project's "
                           "Inception network"),
        "cleanfid_mode": CLEAN_MODE,
        "legacy_mode": f"{LEGACY_MODE}: equals {LEGACY_IS}_<direction> (same features, TF1-compatible "
                       "bilinear resize inside the network), so it is not stored twice",
        "feature_layer": "2048 (pool)",
        "prc_neighborhood_k": PRC_NEIGHBORHOOD,
        "metrics": METRICS,
    }
    if too_small:
        protocol["prc_not_computed"] = (f"{', '.join(too_small)}: precision/recall need more than "
                                        f"k = {PRC_NEIGHBORHOOD} images on each side")
    return metrics, protocol
