"""FID and KID of image arrays with torch-fidelity, as the evaluate stage and training score them.

torch-fidelity's inception-v3-compat extractor (TF1-compatible bilinear resize to 299x299) gives
the 2048-d pool features, with the weights `cyclegan.inception` resolves. torch-fidelity extracts
and caches the features and computes KID (its kid_features_to_metric: 100 subsets, rng seed 2020,
subset size min(1000, n1, n2) fixed before any extraction). FID is the Frechet distance of
torch-fidelity's feature statistics, but its trace term tr sqrt(S1 S2) is taken as the nuclear
norm of the centred cross-product (exact, see `frechet_distance`) instead of torch-fidelity's
general eigendecomposition of a 2048 x 2048 product, which takes ~20 s per FID on a 2-core CPU.
tests/test_evaluate.py checks both agree.

Real test sets are cached by content: their features are stored under the cache dir
($CYCLEGAN_CACHE, see inception.cache_dir) with a name made of the array's sha256, the weights'
sha256, the torch-fidelity version and the device type; re-evaluating extracts only translations.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from . import inception
from .config import Config, EvalConfig
from .device import exact_fp32, resolve_device
from .errors import UserError
from .vocabulary import A2B, B2A, BASELINE, FID, KID, KID_STD, metric

KID_MAX_SUBSET = 1000
KID_SUBSETS = 100
KID_RNG_SEED = 2020  # torch-fidelity's default, stated so eval.json records it


class ImageArrayDataset(Dataset):
    """uint8 (N, H, W, 3) array -> uint8 (3, H, W) tensors, the input torch-fidelity expects."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[i], dtype=np.uint8)).permute(2, 0, 1)


def kid_subset_size(n1: int, n2: int) -> int:
    """min(1000, n1, n2): torch-fidelity's default size, shrunk to what both sets can provide."""
    if min(n1, n2) < 2:
        raise UserError(f"KID needs at least 2 images on each side, got {n1} and {n2}")
    return min(KID_MAX_SUBSET, n1, n2)


def array_sha256(images: np.ndarray) -> str:
    h = hashlib.sha256(f"{images.shape}|{images.dtype}|".encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID of two feature sets: |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2).

    With centred, scaled features A (n1 x d) and B (n2 x d), S1 = A'A and S2 = B'B. The non-zero
    eigenvalues of S1 S2 = A'(A B')B are those of (A B')(A B')', so tr sqrt(S1 S2) is the sum of
    the singular values of the n1 x n2 matrix A B': exact, and cheap while a test set has fewer
    images than features. Larger sets use tr sqrt(R S2 R) with R = sqrt(S1), all symmetric.
    """
    f1 = np.asarray(features1, dtype=np.float64)
    f2 = np.asarray(features2, dtype=np.float64)
    n1, n2 = len(f1), len(f2)
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    a = (f1 - mu1) / math.sqrt(n1 - 1)  # np.cov's normalisation, as torch-fidelity uses
    b = (f2 - mu2) / math.sqrt(n2 - 1)
    if min(n1, n2) <= f1.shape[1]:
        trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    else:
        s1, s2 = a.T @ a, b.T @ b
        w, v = np.linalg.eigh(s1)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2 * trace_sqrt)


@dataclass
class InceptionScorer:
    """torch-fidelity's Inception extractor with resolved weights, reused across calls.

    `images_extracted` counts images that really went through the network (cache misses).
    """

    weights: inception.InceptionWeights
    device: str = "cpu"
    batch_size: int = 16
    images_extracted: int = 0
    _extractor: Any = field(default=None, repr=False)

    @classmethod
    def from_config(cls, settings: EvalConfig) -> InceptionScorer:
        return cls(inception.resolve(settings.inception_weights),
                   resolve_device(settings.device, "eval.device").type,
                   settings.batch_size)

    @property
    def cache_root(self) -> Path:
        return inception.cache_dir() / "fidelity"

    def extractor(self):
        if self._extractor is None:
            from torch_fidelity.utils import create_feature_extractor

            kwargs = self.weights.fidelity_kwargs()
            self._extractor = create_feature_extractor(
                kwargs["feature_extractor"], [inception.POOL_LAYER], cuda=self.device == "cuda",
                feature_extractor_weights_path=kwargs["feature_extractor_weights_path"], verbose=False)

            def count(module, inputs):
                self.images_extracted += inputs[0].shape[0]

            self._extractor.register_forward_pre_hook(count)
        return self._extractor

    def cache_name(self, images: np.ndarray) -> str:
        import torch_fidelity

        return (f"cyclegan-{array_sha256(images)[:24]}-w{self.weights.sha256[:12]}"
                f"-tf{torch_fidelity.__version__}-{self.device}-ieee")  # true fp32, see `features`

    def features(self, images: np.ndarray, cache: bool) -> np.ndarray:
        """(N, 2048) pool features of uint8 (N, H, W, 3) images; cached by content if `cache`."""
        from torch_fidelity.utils import extract_featuresdict_from_input_id_cached

        name = self.cache_name(images) if cache else None
        kwargs = dict(
            input1=ImageArrayDataset(images), input1_cache_name=name, cache=cache,
            cache_root=str(self.cache_root), cuda=self.device == "cuda", batch_size=self.batch_size,
            verbose=False,
            # No DataLoader worker processes: items are in-memory slices, and forking workers
            # for a few dozen images costs more than it saves.
            save_cpu_ram=True,
        )
        layer = inception.POOL_LAYER
        # True fp32 on GPUs too (cuDNN's default is TF32), so that scores move with the device
        # no more than they must.
        with exact_fp32():
            feats = extract_featuresdict_from_input_id_cached(1, self.extractor(), **kwargs)[layer]
            if len(feats) != len(images) and name is not None:
                # A cache file that does not describe this array (an interrupted or foreign write).
                cached = self.cache_root / f"{name}-{inception.FEATURE_EXTRACTOR}-features-{layer}.pt"
                cached.unlink(missing_ok=True)
                feats = extract_featuresdict_from_input_id_cached(1, self.extractor(), **kwargs)[layer]
        return feats.numpy()

    def fid_kid(self, fake: np.ndarray, real: np.ndarray, *, cache_fake: bool = False,
                cache_real: bool = True) -> dict[str, float]:
        subset = kid_subset_size(len(fake), len(real))  # fixed before any extraction
        f1 = self.features(fake, cache_fake)
        f2 = self.features(real, cache_real)
        return fid_kid_from_features(f1, f2, subset)


def fid_kid_from_features(f1: np.ndarray, f2: np.ndarray, subset: int) -> dict[str, float]:
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    kid = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=KID_SUBSETS,
                                 kid_subset_size=subset, rng_seed=KID_RNG_SEED, verbose=False)
    return {"fid": frechet_distance(f1, f2), "kid": kid[KEY_METRIC_KID_MEAN],
            "kid_std": kid[KEY_METRIC_KID_STD], "kid_subset_size": subset}


@functools.lru_cache(maxsize=2)
def _scorer(settings: EvalConfig) -> InceptionScorer:
    """One extractor per process and settings."""
    return InceptionScorer.from_config(settings)


def fid_kid(fake: np.ndarray, real: np.ndarray, cfg: Config) -> dict[str, float]:
    """FID/KID of uint8 (N, H, W, 3) arrays, for evaluation during training.

    The extractor is loaded once per process and the real set's features are cached by content,
    so each call only runs the network over `fake`. Returns fid, kid, kid_std, kid_subset_size.
    """
    return _scorer(cfg.eval).fid_kid(fake, real)


# What each score compares: A2B against real B, B2A against real A, and the baseline of doing
# nothing (real A against real B); name: (generated or first set, reference set).
TRANSLATION_PAIRS = {A2B.name: (A2B.name, "B"), B2A.name: (B2A.name, "A"), BASELINE: ("A", "B")}


def translation_scores(scorer: InceptionScorer, fake_A2B: np.ndarray, fake_B2A: np.ndarray,
                       real_A: np.ndarray, real_B: np.ndarray, cache_reals: bool = True
                       ) -> tuple[dict[str, float], dict[str, int], dict[str, np.ndarray]]:
    """FID, KID and KID std of each of TRANSLATION_PAIRS, as fid_<name>, kid_<name>, kid_std_<name>;
    the KID subset size of each, fixed before any extraction; and the pool features of the four
    sets (keys A2B, B2A, A, B), for scores that reuse them."""
    images = {"A2B": fake_A2B, "B2A": fake_B2A, "A": real_A, "B": real_B}
    subsets = {name: kid_subset_size(len(images[x]), len(images[y]))
               for name, (x, y) in TRANSLATION_PAIRS.items()}
    feats = {k: scorer.features(v, cache=cache_reals and k in ("A", "B")) for k, v in images.items()}
    metrics: dict[str, float] = {}
    for name, (x, y) in TRANSLATION_PAIRS.items():
        scores = fid_kid_from_features(feats[x], feats[y], subsets[name])
        metrics.update({metric(kind, name): scores[kind] for kind in (FID, KID, KID_STD)})
    return metrics, subsets, feats
