"""Generators that training starts from (params.yaml train.init_from) instead of random weights.

The files are ours (`cyclegan import-authors` writes the authors' published generators so) and
live in models/init/, a dependency of the train stage in dvc.yaml: the path is a param and the
content a dependency, so DVC reruns training when either changes. Their sha256 is part of the
run's fingerprint (cyclegan.checkpoint), so checkpoints of a run started from other weights are
never resumed. The discriminators, optimizers and pools start fresh, as in a run from scratch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .errors import UserError
from .fileio import sha256_file
from .generator_file import open_generator
from .vocabulary import DIRECTIONS, direction_named, direction_of

# The fields of ModelConfig that decide a generator's layers.
FIELDS = ("netG", "ngf", "norm", "use_dropout")


@dataclass(frozen=True)
class InitGenerator:
    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor]


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def load(cfg: Config) -> dict[str, InitGenerator]:
    """{"G_A": ..., "G_B": ...} for the generators train.init_from names, checked against `model`."""
    out = {}
    for name in (d.generator for d in DIRECTIONS):
        path = getattr(cfg.train.init_from, name)
        if not path:
            continue
        key, path = f"train.init_from.{name}", Path(path)
        if not path.is_file():
            raise UserError(f"{key}: {path} not found; write it with `cyclegan import-authors NAME_OR_PATH "
                            f"--output {path}`, or set {key}: \"\" to start {name} from random weights")
        digest = sha256_file(path)
        model, direction, net = open_generator(path, torch.device("cpu"))
        expected = direction_of(name).name
        if direction != expected:
            raise UserError(f"{key}: {path} is a {direction} generator and {name} translates {expected}; "
                            f"name it under train.init_from.{direction_named(direction).generator}, or "
                            f"import "
                            f"it again with `cyclegan import-authors ... --direction {expected}`")
        found = {f: getattr(model, f) for f in FIELDS}
        differ = [f for f in FIELDS if found[f] != getattr(cfg.model, f)]
        if found["netG"].startswith("unet") and "use_dropout" in differ:
            # A U-Net's dropout holds no weights: the same file fits either way, and the params decide.
            differ.remove("use_dropout")
        if differ:
            held = ", ".join(f"{f} {_yaml(found[f])}" for f in FIELDS)
            fix = ", ".join(f"model.{f}: {_yaml(found[f])}" for f in differ)
            raise UserError(f"{key}: {path} holds a generator of {held}; set {fix} in params.yaml to start "
                            f"from it")
        out[name] = InitGenerator(path, digest, net.state_dict())
    return out
