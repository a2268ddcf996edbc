"""The names every stage shares: the two translation directions and the metric names.

A direction ties together what the stages would otherwise each restate: A2B translates the testA
images with G_A (models/G_A.safetensors) and is scored against the real testB images; G_B takes
the translations back. The metric names are those of metrics/eval.json, the per-epoch plot
(metrics/train_eval.csv), MLflow, the report and `cyclegan compare`: `fid_A2B`, `kid_baseline`,
`train_fid_A2B`, ... Add a metric here and every one of them can name it the same way.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Direction:
    name: str       # "A2B": its folder under data/translated, the suffix of its metrics
    source: str     # "testA": the test split it translates
    generator: str  # "G_A": the network, and models/<generator>.safetensors, that translates it
    target: str     # "testB": the real images its translations are compared with
    back: str       # "G_B": the generator of the other direction, which reconstructs the source

    @property
    def target_ground_truth(self) -> str:
        """The split of the embedded dataset holding each source image's exact translation."""
        return f"{self.source}_target"


A2B = Direction("A2B", source="testA", generator="G_A", target="testB", back="G_B")
B2A = Direction("B2A", source="testB", generator="G_B", target="testA", back="G_A")
DIRECTIONS = (A2B, B2A)
TEST_SPLITS = (A2B.source, B2A.source)


def direction_named(name: str) -> Direction:
    return next(d for d in DIRECTIONS if d.name == name)


def direction_of(generator: str) -> Direction:
    """The direction generator `generator` ("G_A" or "G_B") translates."""
    return next(d for d in DIRECTIONS if d.generator == generator)


# --- metric names --------------------------------------------------------------------------------

FID, KID, KID_STD = "fid", "kid", "kid_std"
# Scores to set beside published ones (cyclegan.literature_metrics): clean-FID, and improved
# precision and recall.
CLEANFID, PRECISION, RECALL = "cleanfid", "precision", "recall"
LITERATURE = (CLEANFID, PRECISION, RECALL)
# Real testA against real testB: the score of translating by doing nothing.
BASELINE = "baseline"
# What FID and KID are computed for, each against its reference images.
SCORED = (A2B.name, B2A.name, BASELINE)
# Scored during training (train.eval_every), as MLflow's train_<metric> and metrics/train_eval.csv.
TRAINING_PREFIX = "train_"


def metric(kind: str, scored: str) -> str:
    """`metric(FID, "A2B")` -> "fid_A2B"."""
    return f"{kind}_{scored}"


def during_training(name: str) -> str:
    """The MLflow name of a metric scored during training: "fid_A2B" -> "train_fid_A2B"."""
    return f"{TRAINING_PREFIX}{name}"


def ground_truth(kind: str, direction: Direction, identity: bool = False) -> str:
    """Ground-truth error on the embedded dataset: gt_l1_A2B, or for translation = input
    gt_l1_identity (A2B) and gt_l1_identity_B2A."""
    if not identity:
        return f"gt_{kind}_{direction.name}"
    return f"gt_{kind}_identity" + ("" if direction is A2B else f"_{direction.name}")


# The columns of metrics/train_eval.csv after "epoch", and the report's per-epoch panels.
PER_EPOCH = tuple(metric(kind, d.name) for kind in (FID, KID) for d in DIRECTIONS)
# metrics/eval.json: what experiments are compared by (`dvc exp show`). LITERATURE is left out:
# each column widens `dvc exp show --only-changed` by ~15 characters and the README promises ~220
# (tests/test_pipeline.py asserts <= 230): measured 221 without, 236 with cleanfid_A2B. They are in
# eval_details.json, MLflow (`cyclegan compare --source mlflow`) and the report.
HEADLINE = (*(metric(kind, s) for kind in (FID, KID) for s in SCORED),
            *(ground_truth("l1", d) for d in DIRECTIONS),
            *(ground_truth("l1", d, identity=True) for d in DIRECTIONS))
# `cyclegan compare`'s default metrics, direction by direction; those not in HEADLINE (clean-FID)
# come from MLflow only (--source mlflow), and a default a source lacks is dropped.
COMPARED = (*(metric(kind, d.name) for d in DIRECTIONS for kind in (FID, KID)),
            *(metric(CLEANFID, d.name) for d in DIRECTIONS))
