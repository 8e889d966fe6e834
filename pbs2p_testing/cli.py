"""The `pbs2p` command line run in-process, its output captured (pytest's capsys)."""

from __future__ import annotations

from typing import Any

from pbs2p.service.cli import main


def run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `pbs2p ARGV...`."""
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err
