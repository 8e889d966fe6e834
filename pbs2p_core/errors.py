"""Errors that carry a message meant for the user: what is wrong and what to change."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class Pbs2pError(ValueError):
    """Bad input (a config, a path, a file). The message says what to change."""


class ArtifactError(Pbs2pError):
    """A bad or incomplete artifact (corrupted, truncated, missing file, newer format, wrong shape).

    The message names the file and says what to do."""


# The import names of what each optional extra of pyproject.toml brings: a missing one is named with its extra.
EXTRA_PACKAGES = {
    "ray": {"ray"},
    "s3": {"boto3", "botocore", "s3transfer"},
    "tasks": {"lm_eval", "datasets"},
    "service": {
        "fastapi",
        "starlette",
        "uvicorn",
        "sqlalchemy",
        "alembic",
        "psycopg",
        "prometheus_client",
        "httpx",
        "ray",
    },
}


class MissingExtra(Pbs2pError):
    """A part of pbs2p used without the optional extra that brings its packages; says what to install."""


@contextmanager
def requires_extra(extra: str, what: str) -> Iterator[None]:
    """Around the imports at an optional extra's edge: a missing package of `extra` becomes a `MissingExtra`
    naming the extra (`pip install 'pbs2p[ray]'`); any other missing module is raised as it is."""
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        if top not in EXTRA_PACKAGES[extra]:
            raise
        raise MissingExtra(
            f"{what} needs the '{extra}' extra ({top} is not installed); install it with `pip install 'pbs2p[{extra}]'`"
        ) from exc
