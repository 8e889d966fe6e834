"""Shared by the benchmarks: run one CLI command in a child process and measure its time and peak memory; check
a command line without running it (`--dry-run`); write a results table (and the README's copy of it).

Light to import on purpose: bench/service_load.py's client processes (spawned, so they import the benchmark and
this module again) must be up within the second before a load phase starts. torch and the command line's
parser (seconds to import) are imported inside the two functions that use them."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pbs2p.core.errors import Pbs2pError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def code_env(tree: Path | None) -> dict[str, str]:
    """What a child process needs to run the code of `tree` (None: this tree): its package on PYTHONPATH, and
    PYTHONSAFEPATH so that `python -m` does not put the current directory (this tree, when run from it) first."""
    return {"PYTHONPATH": str(tree or ROOT), "PYTHONSAFEPATH": "1"}


def run_cli(args: list[str]) -> tuple[dict[str, Any], float, float]:
    """`pbs2p ARGS --json` in a child process: (its JSON output, wall seconds, peak RSS in MiB)."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pbs2p.service.cli", *args, "--json"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"pbs2p {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(out), wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def check_cli(args: list[str]) -> str:
    """`pbs2p ARGS --json` parsed as the command line parses it, not run: every option must exist, and a
    compress's config and Ray options must validate. Returns the command line; exits naming a bad option."""
    from pbs2p.service.cli.commands import build_parser, ray_options  # seconds to import: see the module's docstring
    from pbs2p.service.cli.options import config_from_args

    parsed = build_parser().parse_args([*args, "--json"])  # an unknown option exits here (code 2)
    if parsed.cmd == "compress":
        try:
            config_from_args(parsed)
            ray_options(parsed)
        except Pbs2pError as exc:
            raise SystemExit(f"pbs2p {shlex.join(args)}: {exc}") from None
    return shlex.join(["pbs2p", *args, "--json"])


def dry_run(commands: list[list[str]]) -> None:
    """`--dry-run`: print the `pbs2p` command lines a benchmark would run, each checked by `check_cli`."""
    for args in commands:
        print(check_cli(args))
    print(f"{len(commands)} command lines checked against `pbs2p`'s parser and config; nothing was run.")


def machine() -> str:
    import torch  # seconds to import: see the module's docstring

    threads = torch.get_num_threads()
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {threads} threads"


def add_out_option(ap: argparse.ArgumentParser) -> None:
    """`--out DIR`: where the results go (default bench/results, and then README.md's copy of the table too)."""
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        metavar="DIR",
        help="results directory (default bench/results, which also updates README.md's table; any other "
        "directory leaves the committed results and README.md alone, e.g. for a smoke run)",
    )


def write_table(
    name: str, title: str, header: list[str], rows: list[list[str]], notes: list[str], out: Path = RESULTS
) -> Path:
    """The table as `out/NAME.md`; when `out` is bench/results, also into README.md's section NAME."""
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", *notes, ""]
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text(text)
    if out.resolve() == RESULTS.resolve():
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
