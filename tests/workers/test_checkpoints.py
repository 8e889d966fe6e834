"""The checkpoint fingerprint's code version (workers/checkpoints.py): every source that decides the numbers."""

from __future__ import annotations

import shutil
from pathlib import Path

from pbs2p.workers import checkpoints

ROOT = Path(__file__).resolve().parents[2] / "pbs2p"  # the package: pbs2p/core and pbs2p/workers (links)


def copy_sources(dest: Path) -> Path:
    """The code directories and files `code_version` hashes, copied under `dest` (no bytecode)."""
    for d in checkpoints._CODE_DIRS:
        shutil.copytree(ROOT / d, dest / d, ignore=shutil.ignore_patterns("__pycache__"))  # follows the links
    return dest


def test_code_version_covers_every_python_file_under_pbs2p_core_and_workers(tmp_path: Path) -> None:
    """A change to any .py file below pbs2p_core or workers, subpackages included (the artifact format lives in
    pbs2p_core/format/), changes the code version, so a checkpoint from other code is never resumed."""
    root = copy_sources(tmp_path)
    before = checkpoints.code_version(root)
    assert before == checkpoints.code_version()  # a copy hashes like the real tree: only relative paths count
    sources = sorted(p for d in ("core", "workers") for p in (root / d).rglob("*.py"))
    assert {root / "core" / "format" / "linear.py", root / "workers" / "job.py"} <= set(sources)
    for p in sources:
        text = p.read_bytes()
        p.write_bytes(text + b"\n# changed\n")
        assert checkpoints.code_version(root) != before, p.relative_to(root)
        p.write_bytes(text)
    assert checkpoints.code_version(root) == before
    (root / "core" / "format" / "new.py").write_text("X = 1\n")  # a new module counts too
    assert checkpoints.code_version(root) != before
