"""The `pbs2p` command line (entry point `main`)."""

from .commands import main

__all__ = ["main"]
