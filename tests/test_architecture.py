"""The tree tells the truth: dvc.yaml lists the code each stage runs, and stages stand alone.

A stage's code is the import closure of its module and the CLI that runs it, found by reading
the source (every `import` and `from ... import`, at any depth, including the lazy ones inside
functions), plus the packages those modules live in. dvc.yaml must list exactly the files of that
closure under src/: one missing, and a change there would leave stale outputs that `dvc repro`
calls up to date; one too many, and a change there would rerun a stage for nothing.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "cyclegan"
STAGES_PACKAGE = f"{PACKAGE}.stages"


def module_file(name: str) -> Path | None:
    """The source file of module `name` under src/, or None if it is not a module there."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The modules of this project that `path` imports, anywhere in its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from . import paths` imports a module; `from .config import Config` a name.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == PACKAGE and module_file(m) is not None}


def with_packages(modules: set[str]) -> set[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    out = set(modules)
    for m in modules:
        parts = m.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def import_closure(start: set[str]) -> set[Path]:
    seen: set[str] = set()
    todo = with_packages(start)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo |= with_packages(imported_modules(module_file(m))) - seen
    return {module_file(m) for m in seen}


def stage_closure(stage: str) -> set[str]:
    """The files under src/ that `cyclegan <stage>` runs, as dvc.yaml paths."""
    files = import_closure({f"{PACKAGE}.cli", f"{STAGES_PACKAGE}.{stage}"})
    return {str(f.relative_to(ROOT)) for f in files}


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
    for path in python_files(SRC / PACKAGE / "stages"):
        others = {m for m in imported_modules(path) if m.startswith(f"{STAGES_PACKAGE}.")} - {module_name(path)}
        assert not others, f"{path.relative_to(ROOT)} imports the stage modules {sorted(others)}: move what they share to the core"


def _imports_stages(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        if any(n == STAGES_PACKAGE or n.startswith(f"{STAGES_PACKAGE}.") for n in names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level and "stages" in (node.module or "").split("."):
            return True
    return False


def test_nothing_outside_the_stages_imports_them_but_the_cli():
    outside = [p for p in python_files(SRC / PACKAGE) if "stages" not in p.relative_to(SRC / PACKAGE).parts]
    outside += python_files(ROOT / "benchmarks")
    offenders = [str(p.relative_to(ROOT)) for p in outside if p.name != "cli.py" and _imports_stages(p)]
    assert not offenders, f"these import stage modules: {offenders}; import the core instead"
