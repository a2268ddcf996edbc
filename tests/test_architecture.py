"""The tree tells the truth: dvc.yaml lists the code each stage runs, and stages stand alone.

A stage's code is the import closure of its module and the CLI that runs it, found by reading
the source (every `import` and `from ... import`, at any depth, including the lazy ones inside
functions), plus the packages those modules live in. dvc.yaml must list exactly the files of that
closure under src/: one missing, and a change there would leave stale outputs that `dvc repro`
calls up to date; one too many, and a change there would rerun a stage for nothing.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import yaml

from cyclegan import code_closure

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
STAGES_PACKAGE = f"{code_closure.PACKAGE}.stages"


def stage_closure(stage: str) -> set[str]:
    """The files under src/ that `cyclegan <stage>` runs, as dvc.yaml paths."""
    return {str(f.relative_to(ROOT)) for f in code_closure.command_sources(stage, SRC)}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(dvc_stages()))
def test_dvc_yaml_lists_exactly_the_code_each_stage_runs(stage):
    spec = dvc_stages()[stage]
    assert spec["cmd"] == f"cyclegan {stage}"
    listed = {d for d in spec.get("deps", []) if d.startswith("src/") and d.endswith(".py")}
    needed = stage_closure(stage)
    assert not needed - listed, f"dvc.yaml's {stage} stage misses deps it imports: {sorted(needed - listed)}"
    assert not listed - needed, f"dvc.yaml's {stage} stage lists deps it does not import: {sorted(listed - needed)}"


def test_the_closure_follows_lazy_and_relative_imports():
    # train imports fid_kid (for evaluation during training), which imports inception lazily
    # or not: either way inception.py is code the train stage runs.
    train = stage_closure("train")
    assert {"src/cyclegan/model.py", "src/cyclegan/fid_kid.py", "src/cyclegan/inception.py",
            "src/cyclegan/config.py", "src/cyclegan/__init__.py"} <= train
    assert "src/cyclegan/stages/evaluate.py" not in train
    assert "src/cyclegan/comparison.py" in stage_closure("report")


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_stages_do_not_import_each_other():
    for path in python_files(SRC / code_closure.PACKAGE / "stages"):
        others = ({m for m in code_closure.imported_modules(path, SRC) if m.startswith(f"{STAGES_PACKAGE}.")}
                  - {code_closure.module_name(path, SRC)})
        assert not others, f"{path.relative_to(ROOT)} imports the stage modules {sorted(others)}: move what they share to the core"


def _imports_stages(path: Path) -> bool:
    """Whether `path` imports the stages package or a stage module, relatively or not."""
    if path.is_relative_to(SRC):
        found = code_closure.imported_modules(path, SRC)
    else:  # benchmarks: absolute imports only
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.update({node.module, *(f"{node.module}.{a.name}" for a in node.names)})
    return any(m == STAGES_PACKAGE or m.startswith(f"{STAGES_PACKAGE}.") for m in found)


def test_nothing_outside_the_stages_imports_them_but_the_cli():
    package = SRC / code_closure.PACKAGE
    outside = [p for p in python_files(package) if "stages" not in p.relative_to(package).parts]
    outside += python_files(ROOT / "benchmarks")
    offenders = [str(p.relative_to(ROOT)) for p in outside if p.name != "cli.py" and _imports_stages(p)]
    assert not offenders, f"these import stage modules: {offenders}; import the core instead"


def test_the_code_hash_follows_the_train_stage_s_closure_and_nothing_else(tmp_path):
    """The train stage's code is part of a run's fingerprint: a change to a file it runs starts
    a new run (DVC reruns the stage for it), a change elsewhere does not."""
    copy = tmp_path / "src"
    shutil.copytree(SRC / code_closure.PACKAGE, copy / code_closure.PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_closure.sources_sha256("train", copy)
    assert before == code_closure.sources_sha256("train", SRC)
    report = copy / code_closure.PACKAGE / "stages" / "report.py"
    report.write_text(report.read_text() + "\n# a change train does not run\n")
    assert code_closure.sources_sha256("train", copy) == before
    losses = copy / code_closure.PACKAGE / "losses.py"
    losses.write_text(losses.read_text() + "\n# a change train runs\n")
    assert code_closure.sources_sha256("train", copy) != before
