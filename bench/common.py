"""Shared by the benchmarks: run one CLI command in a child process and measure its time and peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def run_cli(args: list[str]) -> tuple[dict[str, Any], float, float]:
    """`pbs2p ARGS --json` in a child process: (its JSON output, wall seconds, peak RSS in MiB)."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args, "--json"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"pbs2p {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(out), wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def machine() -> str:
    import platform

    import torch

    threads = torch.get_num_threads()
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {threads} threads"


def write_table(name: str, title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> Path:
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", *notes, ""]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    _update_readme(name, text)
    return path


def _update_readme(name: str, text: str) -> None:
    """Replace the README's section between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`, if present."""
    readme = ROOT / "README.md"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    doc = readme.read_text()
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        readme.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])
