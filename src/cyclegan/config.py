"""The one typed configuration, loaded and validated from params.yaml.

Every stage calls `load_config()` and gets a frozen `Config`; nothing else reads params.yaml.
Validation happens here, before any compute, and every problem is reported as one line that
names the key and the fix (`ConfigError`).
"""
from __future__ import annotations

import dataclasses
import posixpath
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from . import paths
from .errors import UserError

PARAMS_FILE = "params.yaml"


class ConfigError(UserError):
    """A bad value in params.yaml; the message is one line naming the key."""


@dataclass(frozen=True)
class ToyConfig:
    """The embedded dataset: generated from `seed`, no network needed."""

    image_size: int = 32
    n_train_a: int = 400
    n_train_b: int = 400
    n_test: int = 64
    seed: int = 2017


@dataclass(frozen=True)
class DataConfig:
    # A standard dataset name (horse2zebra, ...), the embedded `toy_horse2zebra`,
    # or a path to a folder holding trainA/ trainB/ testA/ testB/.
    dataset: str = "toy_horse2zebra"
    load_size: int = 32
    crop_size: int = 32
    # What prepare does with an unreadable or unusable image: skip it (and report it) or stop.
    on_bad_image: str = "skip"
    # Images with transparency are composited over this RGB background.
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    no_flip: bool = False
    num_workers: int = 0
    toy: ToyConfig = field(default_factory=ToyConfig)


@dataclass(frozen=True)
class ModelConfig:
    netG: str = "resnet_9blocks"
    netD: str = "basic"
    n_layers_D: int = 3
    ngf: int = 64
    ndf: int = 64
    norm: str = "instance"
    use_dropout: bool = False
    init_type: str = "normal"
    init_gain: float = 0.02


@dataclass(frozen=True)
class InitFromConfig:
    """Generator files (ours, e.g. from `cyclegan import-authors`) in models/init/ to start from;
    "" starts that generator from random weights."""

    G_A: str = ""
    G_B: str = ""


@dataclass(frozen=True)
class TrainConfig:
    gan_mode: str = "lsgan"
    batch_size: int = 1
    n_epochs: int = 100
    n_epochs_decay: int = 100
    lr: float = 0.0002
    beta1: float = 0.5
    beta2: float = 0.999
    pool_size: int = 50
    lambda_gp: float = 10.0
    # "auto" picks cuda when available, else cpu.
    device: str = "auto"
    # CPU threads for torch; 0 keeps torch's default (with several processes on this machine, the
    # cores shared out among them).
    threads: int = 0
    # Training processes on this machine: above 1, `cyclegan train` starts that many under torch's
    # elastic launcher (as `torchrun --standalone --nproc_per_node N` would), one per GPU, or on
    # CPUs with Gloo. The global batch is processes x batch_size.
    nproc_per_node: int = 1
    # "auto": fp32 (on Ampere and later GPUs cuDNN runs fp32 convolutions as TF32, torch's
    # default; translate and evaluate run in true fp32) until evidence shows bf16 trains as well
    # (README: bf16 against fp32). "bf16": bf16 autocast, on GPUs with native bf16 and on CPUs with
    # AVX512-BF16 or AMX (there 1.3-1.7x faster for the 9-block network, slower for small ones);
    # an error on hardware that would only emulate it. "fp32": no autocast.
    precision: str = "auto"
    # channels_last memory format for the networks and images. Off until measured faster on a
    # GPU: instance norm and CUDA's reflection pad return NCHW, so every convolution may convert
    # layouts back and forth (benchmarks/train_step.py --channels-last). Slower on CPU.
    channels_last: bool = False
    # torch.compile the networks (inductor; on CPU it needs a C++ compiler and its first step
    # compiles for a minute or two).
    compile: bool = False
    # cuDNN deterministic + torch deterministic algorithms: bit-reproducible on GPU, slower.
    deterministic: bool = False
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # Evaluate FID/KID every N epochs during training (0: only at the end, in `evaluate`).
    eval_every: int = 0
    # Stop after this many optimisation steps (0: run all epochs); for smoke tests.
    max_steps: int = 0
    # With n_epochs and n_epochs_decay 0, the init_from generators are the result, unchanged.
    init_from: InitFromConfig = field(default_factory=InitFromConfig)


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 16
    device: str = "auto"
    # "auto": torch-fidelity's own weights when cached or reachable, else converted offline ones;
    # or a path to torch-fidelity's weights-inception-2015-12-05 .pth file.
    inception_weights: str = "auto"
    # Translate at the full resolution of each test image (sides rounded to the multiple the
    # generator needs: 4 for the ResNets, 128 or 256 for the U-Nets; networks.GENERATORS).
    full_resolution: bool = False
    # Number of fixed test images in the sample grids (logged every epoch by train, and in the
    # report); 0: no grids.
    n_samples: int = 4


@dataclass(frozen=True)
class TrackingConfig:
    # Register train's A->B generator model in the MLflow model registry under this name (a new
    # version per run); "" registers nothing. Any run's model can also be registered afterwards.
    register_as: str = ""


@dataclass(frozen=True)
class Config:
    # Weight of both cycle-consistency L1 terms (paper: 10).
    lambda_cycle: float = 10.0
    # Identity weight RELATIVE to lambda_cycle, as in the paper's code: the identity L1 terms
    # ||G_A(b) - b|| and ||G_B(a) - a|| are weighted lambda_cycle * lambda_identity
    # (0.5 with lambda_cycle 10 gives 5). The effective weight is logged as
    # `identity_weight_effective`.
    lambda_identity: float = 0.5
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def identity_weight(self) -> float:
        return self.lambda_cycle * self.lambda_identity

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.on_bad_image": ("skip", "fail"),
    "model.netD": ("basic", "n_layers", "pixel"),
    "model.norm": ("instance", "batch", "none"),
    "model.init_type": ("normal", "xavier", "kaiming", "orthogonal"),
    "train.gan_mode": ("lsgan", "vanilla", "wgangp"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "bf16", "fp32"),
    "eval.device": ("auto", "cpu", "cuda"),
}


# Keys of earlier versions, and what replaced them.
RENAMED = {"train.amp": "'train.precision' (auto, bf16 or fp32; true was auto, false fp32)"}
# Keys of earlier versions that are gone, and why.
REMOVED = {"train.winograd": "the Winograd CPU kernel was removed (it gained ~1% on the paper's network)"}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params.yaml'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        if key in RENAMED:
            raise ConfigError(f"{PARAMS_FILE}: '{key}' is now {RENAMED[key]}")
        if key in REMOVED:
            raise ConfigError(f"{PARAMS_FILE}: '{key}' is no longer a param: {REMOVED[key]}; delete it")
        raise ConfigError(
            f"{PARAMS_FILE}: unknown key '{key}'; known keys here: {', '.join(sorted(names))}"
        )
    values = {}
    for name in names & set(raw):
        values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{PARAMS_FILE}: '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{PARAMS_FILE}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{PARAMS_FILE}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{PARAMS_FILE}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{PARAMS_FILE}: '{key}' must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")


def _check(cfg: Config) -> None:
    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{PARAMS_FILE}: '{key}' {msg}")

    # Imported here, not at the top: the networks import torch, which a process that only reads
    # the params (prepare's decoding workers import the CLI) does not need.
    from .networks import GENERATORS, size_multiple

    flat = flatten(cfg.to_dict())
    for key, allowed in {**CHOICES, "model.netG": tuple(GENERATORS)}.items():
        if flat[key] not in allowed:
            fail(key, f"is {flat[key]!r}; choose one of: {', '.join(allowed)}")
    for key in ("lambda_cycle", "lambda_identity", "train.lambda_gp", "train.lr", "model.init_gain"):
        if flat[key] < 0:
            fail(key, f"must be >= 0, got {flat[key]}")
    if cfg.train.lr == 0:
        fail("train.lr", "must be > 0")
    for key in ("train.beta1", "train.beta2"):
        if not 0 <= flat[key] < 1:
            fail(key, f"must be in [0, 1), got {flat[key]}")
    positive = ("data.load_size", "data.crop_size", "model.ngf", "model.ndf", "model.n_layers_D",
                "train.batch_size", "train.nproc_per_node", "train.log_every", "train.checkpoint_every",
                "train.keep_checkpoints", "eval.batch_size", "data.toy.image_size",
                "data.toy.n_train_a", "data.toy.n_train_b", "data.toy.n_test")
    for key in positive:
        if flat[key] < 1:
            fail(key, f"must be >= 1, got {flat[key]}")
    nonneg = ("train.n_epochs", "train.n_epochs_decay", "train.pool_size", "train.threads",
              "train.eval_every", "train.max_steps", "data.num_workers", "eval.n_samples", "seed")
    for key in nonneg:
        if flat[key] < 0:
            fail(key, f"must be >= 0, got {flat[key]}")
    init = cfg.train.init_from
    for name in ("G_A", "G_B"):
        path = getattr(init, name)
        parts = PurePosixPath(posixpath.normpath(path)).parts
        if path and (len(parts) < 3 or parts[:2] != paths.INIT.parts):
            # DVC reruns train when a file of that folder changes; a file elsewhere it would not see.
            fail(f"train.init_from.{name}", f"is {path!r}: generator files to start from must be in "
                 f"{paths.INIT}/, which the train stage of dvc.yaml depends on; move it there")
    if cfg.train.n_epochs + cfg.train.n_epochs_decay < 1 and not (init.G_A or init.G_B):
        fail("train.n_epochs", "plus train.n_epochs_decay must be >= 1 (0 only with train.init_from, "
             "to evaluate those generators as they are)")
    if cfg.data.crop_size > cfg.data.load_size:
        fail("data.crop_size", f"({cfg.data.crop_size}) must not exceed data.load_size "
                               f"({cfg.data.load_size})")
    if any(not 0 <= c <= 255 for c in cfg.data.alpha_background):
        fail("data.alpha_background", "must hold three values in 0..255")
    multiple = size_multiple(cfg.model.netG)
    if cfg.data.crop_size % multiple:
        fail("data.crop_size", f"({cfg.data.crop_size}) must be a multiple of {multiple} for "
                               f"model.netG={cfg.model.netG}")
    if cfg.model.netD == "basic" and cfg.model.n_layers_D != 3:
        fail("model.n_layers_D", "is only used with model.netD=n_layers (basic is 3 layers); set netD: "
                                 "n_layers")
    # The PatchGAN needs at least one output pixel.
    if cfg.model.netD in ("basic", "n_layers"):
        size = cfg.data.crop_size
        for _ in range(cfg.model.n_layers_D):
            size = size // 2
        if size + 2 - 3 < 1:
            fail("data.crop_size", f"({cfg.data.crop_size}) is too small for a {cfg.model.n_layers_D}-layer "
                                   f"PatchGAN")
    name = cfg.tracking.register_as
    if name and (not name.strip() or "/" in name or ":" in name):
        fail("tracking.register_as", f"is {name!r}: an MLflow model name has no '/' or ':' and is not blank; "
                                     f"choose another, or \"\" to register nothing")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used for validation messages and MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_from_dict(raw: dict[str, Any]) -> Config:
    cfg = _build(Config, raw, "")
    _check(cfg)
    return cfg


def _read_params(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: not found; run cyclegan from the project root (where params.yaml is)")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_config(path: str | Path = PARAMS_FILE) -> Config:
    return config_from_dict(_read_params(Path(path)))


def load_config_with(overrides: dict[str, Any], path: str | Path = PARAMS_FILE) -> Config:
    """params.yaml with `overrides` (dotted key -> value, what `dvc exp run -S key=value` sets)
    applied, validated. A key must already be in the file: DVC refuses to add one with -S."""
    path = Path(path)
    raw = _read_params(path)
    for key, value in overrides.items():
        node, *parents = raw, *key.split(".")[:-1]
        for depth, part in enumerate(parents):
            group = ".".join(parents[:depth + 1])
            if part not in node:
                raise ConfigError(f"{path} has no key '{group}' (in '{key}')")
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: '{group}' is a value, not a group of keys; there is no '{key}'")
        leaf = key.split(".")[-1]
        if leaf not in node:
            raise ConfigError(f"{path} has no key '{key}'; keys there: {', '.join(sorted(map(str, node)))}")
        node[leaf] = value
    return config_from_dict(raw)
