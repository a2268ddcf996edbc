"""The source files each `cyclegan <command>` runs: the import closure of its stage module and the CLI.

Read from the source, not from what happens to be imported: every `import` and `from ... import`
at any depth (the lazy ones inside functions too), plus the packages the modules live in. dvc.yaml
lists these files as each stage's code (tests/test_architecture.py keeps it exact), and the train
stage hashes its own into the checkpoint fingerprint, so a run is resumed only by the code that
started it, as DVC reruns the stage when that code changes.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "cyclegan"
SRC = Path(__file__).resolve().parents[1]  # the folder that holds the package


def module_file(name: str, src: Path = SRC) -> Path | None:
    """The source file of module `name` under `src`, or None if it is not one of this package's."""
    base = src.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, src: Path = SRC) -> set[str]:
    """The modules of this package that `path` imports, anywhere in its code."""
    name = module_name(path, src)
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
    return {m for m in found if m.split(".")[0] == PACKAGE and module_file(m, src) is not None}


def _with_packages(modules: set[str]) -> set[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    out = set(modules)
    for m in modules:
        parts = m.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def import_closure(start: set[str], src: Path = SRC) -> list[Path]:
    seen: set[str] = set()
    todo = _with_packages(start)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo |= _with_packages(imported_modules(module_file(m, src), src)) - seen
    return sorted(module_file(m, src) for m in seen)


def command_sources(command: str, src: Path = SRC) -> list[Path]:
    """What `cyclegan <command>` runs: the CLI, the stage module, and all they import."""
    return import_closure({f"{PACKAGE}.cli", f"{PACKAGE}.stages.{command}"}, src)


def sources_sha256(command: str, src: Path = SRC) -> str:
    """A hash of the path and content of every source file `cyclegan <command>` runs."""
    h = hashlib.sha256()
    for path in command_sources(command, src):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
