"""Fixtures of the end-to-end tests: a fresh schema in the PostgreSQL server on 127.0.0.1:5432."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema in the PostgreSQL server on 127.0.0.1:5432 (skipped loudly elsewhere, a failure under CI)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True, connect_timeout=5) as c:
            c.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as exc:
        msg = f"PostgreSQL on 127.0.0.1:5432 (database test) is not reachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    yield f"{PG}?options=-csearch_path%3D{schema}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
        c.execute(f"DROP SCHEMA {schema} CASCADE")
