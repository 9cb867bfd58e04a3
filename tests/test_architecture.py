"""The package's import structure: no module-level cycles, and the stages import downstream only.

Read from the source (no imports run), so it is instant and catches a cycle that a lazy import
inside a function would hide: function-level imports count too, except the CLI's, whose commands
import the library lazily so that ``--help`` needs no torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fsl_cache"

STAGE_TWO = ("splits", "training", "evaluation", "methods", "runs", "sweeps", "reports", "inference")
"""Packages that work on stores and must not reach back into stage one's extraction."""
LOWER = {
    "store": ("errors", "processes"),
    "datasets": ("errors",),
    "backbones": ("errors", "defaults", "datasets"),
    "evaluation": ("errors", "store"),
}
"""Packages and every top-level package they may import (besides themselves)."""


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package ``name`` imports (submodules when ``from pkg import submodule``)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            subs = {f"{target}.{a.name}" for a in node.names} & set(known)
            out |= subs if subs and len(subs) == len(node.names) else {target} | subs
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items() if name != "fsl_cache.cli"}


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_stage_two_never_imports_extraction():
    offenders = [
        f"{m} -> {t}"
        for m, targets in graph().items()
        if package(m) in STAGE_TWO
        for t in targets
        if package(t) == "extraction"
    ]
    assert not offenders, offenders


def test_lower_packages_import_only_what_lies_below_them():
    offenders = [
        f"{m} -> {t}"
        for m, targets in graph().items()
        if package(m) in LOWER
        for t in targets
        if package(t) not in (package(m), *LOWER[package(m)])
    ]
    assert not offenders, offenders
