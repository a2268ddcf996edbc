"""`cyclegan evaluate`: FID and KID of both translation directions, and ground-truth error on toy data.

Protocol (recorded in metrics/eval.json under "protocol"):
  A2B       data/translated/A2B/<testA name>.png  vs  real testB
  B2A       data/translated/B2A/<testB name>.png  vs  real testA
  baseline  real testA vs real testB: the score of translating A2B by doing nothing
Reals are the prepared test arrays (crop_size x crop_size); translations of another size are
resized to that size (bicubic) so both sides of every comparison have the same resolution.
torch-fidelity's inception-v3-compat extractor (TF1-compatible bilinear resize to 299x299) gives
the 2048-d pool features, with the weights `cyclegan.inception` resolves.

Where the numbers come from: torch-fidelity extracts and caches the features and computes KID
(its kid_features_to_metric: 100 subsets, rng seed 2020, subset size min(1000, n1, n2) fixed before
any extraction). FID is the Frechet distance of torch-fidelity's feature statistics, but its
trace term tr sqrt(S1 S2) is taken as the nuclear norm of the centred cross-product (exact, see
`frechet_distance`) instead of torch-fidelity's general eigendecomposition of a 2048 x 2048
product, which takes ~20 s per FID on a 2-core CPU. tests/test_evaluate.py checks both agree.

Real test sets are cached by content: their features are stored under the cache dir
($CYCLEGAN_CACHE, see inception.cache_dir) with a name made of the array's sha256, the weights'
sha256, the torch-fidelity version and the device type; re-evaluating extracts only translations.

On the embedded toy dataset each test image has its exact translation (testA_target,
testB_target), so the ground-truth error is reported too, on the [0, 1] scale:
  gt_l1_*          mean absolute error over all pixels and channels
  gt_psnr_*        per-image PSNR (MSE floored at 1e-10, i.e. at most 100 dB), averaged
  gt_l1_object_*   the same L1 restricted to pixels where input and target differ (the animals):
                   the background is shared by both domains, so the full-image L1 is dominated
                   by pixels a model only has to copy
  ..._identity     the same for "translation = input", the do-nothing baseline
                   (gt_*_identity for A2B, gt_*_identity_B2A for B2A)
"""
from __future__ import annotations

import functools
import hashlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .. import inception, paths, tracking
from ..config import Config
from ..device import resolve_device
from ..data import PreparedDataset, dataset_name
from ..errors import UserError
from ..fileio import write_json

KID_MAX_SUBSET = 1000
KID_SUBSETS = 100
KID_RNG_SEED = 2020  # torch-fidelity's default, stated so eval.json records it
PSNR_MSE_FLOOR = 1e-10
DIRECTIONS = {"A2B": ("testA", "testB"), "B2A": ("testB", "testA")}  # direction: (input, reference)


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
    def from_config(cls, cfg: Config) -> "InceptionScorer":
        return cls(inception.resolve(cfg.eval.inception_weights), resolve_device(cfg.eval.device, "eval.device").type,
                   cfg.eval.batch_size)

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
                f"-tf{torch_fidelity.__version__}-{self.device}")

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
        feats = extract_featuresdict_from_input_id_cached(1, self.extractor(), **kwargs)[layer]
        if len(feats) != len(images) and name is not None:
            # A cache file that does not describe this array (an interrupted or foreign write).
            (self.cache_root / f"{name}-{inception.FEATURE_EXTRACTOR}-features-{layer}.pt").unlink(missing_ok=True)
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
def _scorer(weights_setting: str, device: str, batch_size: int) -> InceptionScorer:
    return InceptionScorer(inception.resolve(weights_setting), resolve_device(device, "eval.device").type, batch_size)


def fid_kid(fake: np.ndarray, real: np.ndarray, cfg: Config) -> dict[str, float]:
    """FID/KID of uint8 (N, H, W, 3) arrays, for evaluation during training.

    The extractor is loaded once per process and the real set's features are cached by content,
    so each call only runs the network over `fake`. Returns fid, kid, kid_std, kid_subset_size.
    """
    scorer = _scorer(cfg.eval.inception_weights, cfg.eval.device, cfg.eval.batch_size)
    return scorer.fid_kid(fake, real)


def translated_file(folder: Path, name: str) -> Path:
    """Where the translate stage writes the translation of test image `name`."""
    return folder / f"{Path(name).stem}.png"


def load_translations(folder: Path, names: list[str], size: tuple[int, int]) -> tuple[np.ndarray, int]:
    """The translations of `names` as uint8 (N, H, W, 3) at `size` (H, W); and how many were resized."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no translations; run `dvc repro translate` (or `dvc repro`) first")
    files = [translated_file(folder, n) for n in names]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: missing ({len(missing)} of {len(files)} translations); "
                        f"run `dvc repro translate` (or `dvc repro`) again")
    out = np.empty((len(files), *size, 3), np.uint8)
    resized = 0
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise UserError(f"{f}: cannot be read as an image ({type(e).__name__}); "
                            f"run `dvc repro translate` again") from None
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
            resized += 1
        out[i] = np.asarray(im)
    return out, resized


def ground_truth_errors(inputs: np.ndarray, fakes: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Errors of the translations and of the identity (input as translation) against the targets."""
    x = inputs.astype(np.float64) / 255
    y = fakes.astype(np.float64) / 255
    t = targets.astype(np.float64) / 255
    # Pixels the translation has to change: the animals (plus their anti-aliased rims).
    mask = np.broadcast_to(np.any(x != t, axis=-1, keepdims=True), x.shape)

    def errors(pred: np.ndarray) -> dict[str, float]:
        err = np.abs(pred - t)
        mse = np.maximum((err ** 2).reshape(len(err), -1).mean(axis=1), PSNR_MSE_FLOOR)
        out = {"l1": float(err.mean()), "psnr": float(np.mean(10 * np.log10(1.0 / mse)))}
        if mask.any():
            out["l1_object"] = float(err[mask].mean())
        return out

    return {"translation": errors(y), "identity": errors(x)}


def evaluate(cfg: Config, scorer: InceptionScorer | None = None) -> dict[str, Any]:
    """Compute every metric, write metrics/eval.json, and return its content."""
    import torch_fidelity

    data = PreparedDataset.of(cfg.data.dataset, ("testA", "testB"))
    real = {split: np.asarray(data.array(split)) for split in ("testA", "testB")}
    size = real["testA"].shape[1:3]
    fakes, resized = {}, {}
    for direction, (source, _) in DIRECTIONS.items():
        fakes[direction], resized[direction] = load_translations(
            paths.TRANSLATED / direction, data.names(source), size)

    pairs = {"A2B": (fakes["A2B"], real["testB"]), "B2A": (fakes["B2A"], real["testA"]),
             "baseline": (real["testA"], real["testB"])}
    subsets = {name: kid_subset_size(len(x), len(y)) for name, (x, y) in pairs.items()}

    scorer = scorer or InceptionScorer.from_config(cfg)
    feats = {
        "A2B": scorer.features(fakes["A2B"], cache=False),
        "B2A": scorer.features(fakes["B2A"], cache=False),
        "testA": scorer.features(real["testA"], cache=True),
        "testB": scorer.features(real["testB"], cache=True),
    }
    feature_pairs = {"A2B": ("A2B", "testB"), "B2A": ("B2A", "testA"), "baseline": ("testA", "testB")}
    metrics: dict[str, Any] = {}
    for name, (k1, k2) in feature_pairs.items():
        scores = fid_kid_from_features(feats[k1], feats[k2], subsets[name])
        metrics[f"fid_{name}"] = scores["fid"]
        metrics[f"kid_{name}"] = scores["kid"]
        metrics[f"kid_std_{name}"] = scores["kid_std"]

    has_truth = data.has("testA_target") and data.has("testB_target")
    if has_truth:
        for direction, (source, _) in DIRECTIONS.items():
            errs = ground_truth_errors(real[source], fakes[direction],
                                       np.asarray(data.array(f"{source}_target")))
            identity_suffix = "" if direction == "A2B" else "_B2A"
            for key, value in errs["translation"].items():
                metrics[f"gt_{key}_{direction}"] = value
            for key, value in errs["identity"].items():
                metrics[f"gt_{key}_identity{identity_suffix}"] = value

    protocol = {
        "implementation": f"torch-fidelity {torch_fidelity.__version__}",
        "feature_extractor": inception.FEATURE_EXTRACTOR,
        "feature_layer": inception.POOL_LAYER,
        "fid_trace_term": "nuclear norm of the centred feature cross-product (exact)",
        "weights": scorer.weights.describe(),
        "dataset": dataset_name(cfg.data.dataset),
        "reference": {"A2B": "testB", "B2A": "testA", "baseline": "testA vs testB"},
        "image_size": list(size),
        "inception_input": "torch-fidelity's TF1-compatible bilinear resize to 299x299",
        "counts": {"testA": len(real["testA"]), "testB": len(real["testB"]),
                   "A2B": len(fakes["A2B"]), "B2A": len(fakes["B2A"])},
        "translations_resized": resized,
        "kid_subset_size": subsets,
        "kid_subsets": KID_SUBSETS,
        "kid_rng_seed": KID_RNG_SEED,
        "device": scorer.device,
    }
    if has_truth:
        protocol["ground_truth"] = ("toy targets on [0,1]: l1 = mean abs error, psnr = mean per-image "
                                    "PSNR (<= 100 dB), l1_object = l1 where input != target")
    result = {**metrics, "protocol": protocol}
    write_json(paths.EVAL_METRICS, result)
    return result


def log_to_mlflow(cfg: Config, result: dict[str, Any]) -> None:
    numeric = {k: v for k, v in result.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    weights = result["protocol"]["weights"]
    with tracking.reattach(cfg) as mlflow:
        mlflow.log_metrics(numeric)
        mlflow.set_tags({"inception_weights": f"{weights['kind']}:{weights['sha256'][:12]}",
                         "inception_weights_sha256": weights["sha256"]})
        mlflow.log_artifact(str(paths.EVAL_METRICS))


def main(cfg: Config, args=None) -> None:
    result = evaluate(cfg)
    log_to_mlflow(cfg, result)
    summary = ", ".join(f"{k} {result[k]:.4g}" for k in ("fid_A2B", "fid_B2A", "fid_baseline", "kid_A2B", "kid_B2A"))
    if "gt_l1_A2B" in result:
        summary += f", gt_l1_A2B {result['gt_l1_A2B']:.4f} (identity {result['gt_l1_identity']:.4f})"
    weights = result["protocol"]["weights"]
    print(f"cyclegan evaluate: {summary}; Inception weights {weights['kind']}:{weights['sha256'][:12]} "
          f"-> {paths.EVAL_METRICS}", file=sys.stderr)
