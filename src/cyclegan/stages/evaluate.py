"""`cyclegan evaluate`: FID and KID of both translation directions, and ground-truth error on toy data.

Two files: metrics/eval.json, the DVC metrics people compare across experiments (FID and KID both
ways and for the baseline, the ground-truth L1 on toy data), and metrics/eval_details.json, every
figure computed (KID's std, PSNR, object L1, clean-FID and precision/recall:
cyclegan.literature_metrics) with the protocol, a plain output, so that
`dvc exp show` stays a table of results. MLflow gets all of them.

Protocol (recorded in metrics/eval_details.json under "protocol"):
  A2B       data/translated/A2B/<testA name>.png  vs  real testB
  B2A       data/translated/B2A/<testB name>.png  vs  real testA
  baseline  real testA vs real testB: the score of translating A2B by doing nothing
Reals are the prepared test arrays (crop_size x crop_size); translations of another size are
resized to that size (bicubic) so both sides of every comparison have the same resolution.
How FID and KID are computed, and how real test sets' features are cached: cyclegan.fid_kid.

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

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import inception, literature_metrics, paths, tracking
from ..config import Config
from ..datasets.sources import folder_name
from ..prepared_data import PreparedDataset
from ..errors import UserError
from ..fid_kid import KID_RNG_SEED, KID_SUBSETS, InceptionScorer, translation_scores
from ..fileio import write_json
from ..vocabulary import A2B, B2A, BASELINE, DIRECTIONS, FID, HEADLINE, KID, TEST_SPLITS, ground_truth, metric

PSNR_MSE_FLOOR = 1e-10


def load_translations(folder: Path, names: list[str], size: tuple[int, int]) -> tuple[np.ndarray, int]:
    """The translations of `names` as uint8 (N, H, W, 3) at `size` (H, W); and how many were resized."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no translations; run `dvc repro translate` (or `dvc repro`) first")
    files = [folder / paths.translated_name(n) for n in names]
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
    """Compute every metric, write metrics/eval.json and eval_details.json, and return the details."""
    import torch_fidelity

    data = PreparedDataset.of(cfg.data.dataset, TEST_SPLITS)
    real = {split: np.asarray(data.array(split)) for split in TEST_SPLITS}
    size = real[A2B.source].shape[1:3]
    fakes, resized = {}, {}
    for d in DIRECTIONS:
        fakes[d.name], resized[d.name] = load_translations(paths.TRANSLATED / d.name, data.names(d.source),
                                                           size)

    scorer = scorer or InceptionScorer.from_config(cfg.eval)
    metrics: dict[str, Any]
    metrics, subsets, pool_features = translation_scores(scorer, fakes[A2B.name], fakes[B2A.name],
                                                         real[A2B.source], real[B2A.source])
    # clean-FID and precision/recall: one more Inception pass (clean mode), the pool features reused.
    images = {A2B.name: fakes[A2B.name], B2A.name: fakes[B2A.name], "A": real[A2B.source],
              "B": real[B2A.source]}
    literature, literature_protocol = literature_metrics.literature_scores(scorer, images, pool_features)
    metrics.update(literature)

    has_truth = all(data.has(d.target_ground_truth) for d in DIRECTIONS)
    if has_truth:
        for d in DIRECTIONS:
            errs = ground_truth_errors(real[d.source], fakes[d.name],
                                       np.asarray(data.array(d.target_ground_truth)))
            for key, value in errs["translation"].items():
                metrics[ground_truth(key, d)] = value
            for key, value in errs["identity"].items():
                metrics[ground_truth(key, d, identity=True)] = value

    protocol = {
        "implementation": f"torch-fidelity {torch_fidelity.__version__}",
        "feature_extractor": inception.FEATURE_EXTRACTOR,
        "feature_layer": inception.POOL_LAYER,
        "fid_trace_term": "nuclear norm of the centred feature cross-product (exact)",
        "weights": scorer.weights.describe(),
        "dataset": folder_name(cfg.data.dataset),
        "reference": {**{d.name: d.target for d in DIRECTIONS}, BASELINE: f"{A2B.source} vs {A2B.target}"},
        "image_size": list(size),
        "inception_input": "torch-fidelity's TF1-compatible bilinear resize to 299x299",
        "counts": {**{split: len(real[split]) for split in TEST_SPLITS},
                   **{d.name: len(fakes[d.name]) for d in DIRECTIONS}},
        "translations_resized": resized,
        "kid_subset_size": subsets,
        "kid_subsets": KID_SUBSETS,
        "kid_rng_seed": KID_RNG_SEED,
        "device": scorer.device,
        "literature": literature_protocol,
    }
    if has_truth:
        protocol["ground_truth"] = ("toy targets on [0,1]: l1 = mean abs error, psnr = mean per-image "
                                    "PSNR (<= 100 dB), l1_object = l1 where input != target")
    result = {**metrics, "protocol": protocol}
    write_json(paths.EVAL_DETAILS, result)
    write_json(paths.EVAL_METRICS, {k: metrics[k] for k in HEADLINE if k in metrics})
    return result


def log_to_mlflow(cfg: Config, result: dict[str, Any]) -> None:
    numeric = {k: v for k, v in result.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    weights = result["protocol"]["weights"]
    with tracking.reattach(cfg) as mlflow:
        mlflow.log_metrics(numeric)
        mlflow.set_tags({"inception_weights": f"{weights['kind']}:{weights['sha256'][:12]}",
                         "inception_weights_sha256": weights["sha256"]})
        mlflow.log_artifact(str(paths.EVAL_METRICS))
        mlflow.log_artifact(str(paths.EVAL_DETAILS))


def main(cfg: Config, args=None) -> None:
    result = evaluate(cfg)
    log_to_mlflow(cfg, result)
    shown = (*(metric(FID, s) for s in (A2B.name, B2A.name, BASELINE)),
             *(metric(KID, d.name) for d in DIRECTIONS))
    summary = ", ".join(f"{k} {result[k]:.4g}" for k in shown)
    gt, gt_identity = ground_truth("l1", A2B), ground_truth("l1", A2B, identity=True)
    if gt in result:
        summary += f", {gt} {result[gt]:.4f} (identity {result[gt_identity]:.4f})"
    weights = result["protocol"]["weights"]
    print(f"cyclegan evaluate: {summary}; Inception weights {weights['kind']}:{weights['sha256'][:12]} "
          f"-> {paths.EVAL_METRICS}", file=sys.stderr)
