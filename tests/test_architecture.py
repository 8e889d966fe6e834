"""The layer rules of docs/architecture.md, checked on the source: who may import whom, no import cycles, no
imports hidden inside functions to dodge one, modules of one idea (no module far above 500 lines)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the folders and the installed names they are (pbs2p/ links them)
PACKAGES = {
    "pbs2p_core": "pbs2p.core",
    "workers": "pbs2p.workers",
    "service": "pbs2p.service",
    "pbs2p_testing": "pbs2p.testing",
}
# who may import whom: each layer only the ones below it (pbs2p.testing builds on everything, nothing on it)
MAY_IMPORT = {
    "pbs2p.core": set(),
    "pbs2p.workers": {"pbs2p.core"},
    "pbs2p.service": {"pbs2p.core", "pbs2p.workers"},
    "pbs2p.testing": {"pbs2p.core", "pbs2p.workers", "pbs2p.service"},
}
# a function-level import of a project module is allowed only at an optional extra's edge, marked so
EXTRA_MARK = "# extra:"
EXTRAS = {"ray", "s3", "service", "tasks"}
FOLDER_NAMES = set(PACKAGES)  # importable from the repository's root too, but a second copy of every module
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """Installed module name -> source file, e.g. pbs2p.core.format.linear -> pbs2p_core/format/linear.py."""
    out = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [name, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def layer(module: str) -> str:
    return ".".join(module.split(".")[:2])


MODULES = modules()


def _known(name: str) -> str | None:
    """The project module `name` is, or lies in (a dotted name may end in an attribute); None outside."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> Iterator[str]:
    """The project modules an import statement imports (absolute names)."""
    if isinstance(node, ast.Import):
        candidates = [a.name for a in node.names]
    else:
        prefix = node.module or ""
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join([*base, node.module] if node.module else base)
        # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
        candidates = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
    for name in candidates:
        known = _known(name)
        if known is not None:
            yield known


def imports(module: str) -> Iterator[tuple[str, ast.stmt, bool]]:
    """(imported project module, the statement, whether it sits at module level) for every import of `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for name in _resolve(module, node, path.name == "__init__.py"):
                if name != module:
                    yield name, node, id(node) in top


def test_the_project_has_its_layers() -> None:
    assert {layer(m) for m in MODULES} == set(PACKAGES.values())
    assert {"pbs2p.core.format.linear", "pbs2p.workers.job", "pbs2p.service.api.app"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layer_direction(module: str) -> None:
    own = layer(module)
    for name, node, _ in imports(module):
        other = layer(name)
        assert other == own or other in MAY_IMPORT[own], (
            f"{MODULES[module].relative_to(ROOT)}:{node.lineno}: {own} must not import {other} ({name})"
        )


@pytest.mark.parametrize("path", sorted({*MODULES.values(), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py")}))
def test_imports_use_the_installed_names(path: Path) -> None:
    """`pbs2p.core`, never the folder `pbs2p_core`: importing both would load every module twice."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in FOLDER_NAMES, f"{path.relative_to(ROOT)}:{node.lineno}: {name}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_level_imports_of_the_project(module: str) -> None:
    """Imports of project modules sit at module level; inside a function only at an optional extra's edge
    (`# extra: ray`), never to dodge a cycle. `if TYPE_CHECKING:` imports would hide one too."""
    lines = MODULES[module].read_text().splitlines()
    for name, node, top in imports(module):
        where = f"{MODULES[module].relative_to(ROOT)}:{node.lineno}"
        if top:
            continue
        mark = lines[node.lineno - 1].partition(EXTRA_MARK)[2].strip()
        assert mark in EXTRAS, f"{where}: import of {name} inside a function or block; move it to module level"
        assert layer(name) != layer(module) or name.startswith(
            ("pbs2p.workers.distributed", "pbs2p.workers.storage.s3", "pbs2p.workers.tasks", "pbs2p.service")
        ), where


def test_no_import_cycles() -> None:
    """The module-level import graph of the project is acyclic (packages count as the modules they hold)."""
    graph = {m: {n for n, _, top in imports(m) if top} for m in MODULES}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n] if n in path else [m, n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(n) is None:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_modules_are_of_one_idea() -> None:
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines, split them by responsibility: {big}"
