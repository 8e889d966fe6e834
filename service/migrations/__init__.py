"""The job store's schema, versioned with Alembic: `upgrade(engine)` brings a database to the newest revision (run by
`JobStore(url)` whenever it opens one, and by `pbs2p db upgrade`), `current(engine)` says where a database stands.

The migration environment (env.py, versions/) ships inside the package and is configured here in code; no alembic.ini
is read at run time (the one at the repository root is for developers writing a revision, docs/deploy.md).

A database made before migrations existed (`Base.metadata.create_all`: the tables, no alembic_version) is revision
0001 by construction; it is stamped 0001, then upgraded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from pbs2p.core.errors import Pbs2pError

log = logging.getLogger(__name__)

SCRIPT_DIR = Path(__file__).parent
INITIAL = "0001"  # the schema create_all made before migrations
STORE_TABLES = frozenset({"api_keys", "jobs"})
# Alembic's `op` and `context` are module-level proxies: one migration at a time per process, whatever the database.
_IN_PROCESS = threading.Lock()


def alembic_config(connection: Connection | None = None) -> Config:
    """The Alembic configuration, in code. With `connection`, env.py migrates through it (in its transaction)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_DIR).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@dataclass(frozen=True)
class SchemaState:
    revision: str | None  # None: no alembic_version (an empty database, or one made before migrations)
    head: str
    unversioned_tables: bool  # the store's tables without alembic_version: made before migrations (= 0001)

    @property
    def short(self) -> str:
        return self.revision or (f"{INITIAL} (unversioned)" if self.unversioned_tables else "empty")

    def describe(self) -> str:
        if self.revision == self.head:
            return f"{self.revision} (head)"
        if self.revision is not None:
            return f"{self.revision} (head is {self.head}: run `pbs2p db upgrade`, or start the service)"
        if self.unversioned_tables:
            return f"{INITIAL} without alembic_version (made before migrations; upgrading stamps it {INITIAL})"
        return f"empty (upgrading creates the schema at {self.head})"


def current(engine: Engine) -> SchemaState:
    """Where the database stands; changes nothing. A Pbs2pError when it is at a revision this code does not know."""
    with _errors(engine), engine.connect() as conn:
        return _state(conn, engine)


def upgrade(engine: Engine) -> tuple[SchemaState, str]:
    """Bring the database to head; (the state found, the revision now). Serialised against every other process
    doing the same on this database (`migration_transaction`); the state is read once the lock is held, so the
    second of two processes started together finds head and does nothing."""
    with _errors(engine), _IN_PROCESS, migration_transaction(engine) as conn:
        found = _state(conn, engine)
        if found.revision == found.head:
            return found, found.head
        cfg = alembic_config(conn)
        if found.revision is None and found.unversioned_tables:
            command.stamp(cfg, INITIAL)
        command.upgrade(cfg, "head")
    log.info("job store at %s: schema %s -> %s", _where(engine), found.short, found.head)
    return found, found.head


def downgrade(engine: Engine, revision: str) -> None:
    """Take the database back to `revision` (before running an older pbs2p against it), under the same lock."""
    with _errors(engine), _IN_PROCESS, migration_transaction(engine) as conn:
        found = _state(conn, engine)
        try:
            command.downgrade(alembic_config(conn), revision)
        except CommandError as exc:
            raise Pbs2pError(
                f"cannot take the job store at {_where(engine)} from {found.short} back to {revision!r}: {exc}; "
                f"name an older revision (0001 ... {found.head}), or 'base' to drop every table"
            ) from None


def _state(conn: Connection, engine: Engine) -> SchemaState:
    script = ScriptDirectory.from_config(alembic_config())
    newest = script.get_current_head()
    assert newest is not None  # versions/ holds 0001 at least
    heads = MigrationContext.configure(conn).get_current_heads()
    where = _where(engine)
    for rev in heads:
        try:
            script.get_revision(rev)
        except CommandError:
            raise Pbs2pError(
                f"the job store at {where} is at schema revision {rev!r}, which this pbs2p does not know (its newest "
                f"is {newest!r}): a newer pbs2p has upgraded it. Run that newer pbs2p against this database, or take "
                f"the database back with it first (`pbs2p db downgrade {newest}` there), then start this one"
            ) from None
    if len(heads) > 1:
        raise Pbs2pError(f"the job store at {where} has several schema heads {sorted(heads)}; expected one")
    tables = set(inspect(conn).get_table_names())
    if not heads and tables & STORE_TABLES and not STORE_TABLES <= tables:
        raise Pbs2pError(
            f"the job store at {where} has table(s) {sorted(tables & STORE_TABLES)} but not "
            f"{sorted(STORE_TABLES - tables)} and no alembic_version: it is not a pbs2p job store; "
            f"point PBS2P_DATABASE_URL at an empty database or a pbs2p one"
        )
    return SchemaState(heads[0] if heads else None, newest, not heads and STORE_TABLES <= tables)


@contextmanager
def migration_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction, holding a lock that every process migrating the same database takes, for the whole
    migration (schema and data change together or not at all).

    - PostgreSQL: `pg_advisory_xact_lock` on a key made from the schema's name (so two stores in two schemas of one
      database do not wait for each other); transaction-scoped, so it is released by the commit or rollback and
      cannot leak if the process dies. DDL is transactional in PostgreSQL.
    - SQLite file: a connection of its own on which the transaction starts with BEGIN IMMEDIATE. pysqlite would
      otherwise open no transaction before DDL, and a deferred BEGIN takes no lock until the first write; BEGIN
      IMMEDIATE takes SQLite's write lock at once, so a second process waits in it (busy timeout 30 s) until the
      first commits, then reads the version the first wrote. SQLite's DDL is transactional too. A file lock next
      to the database was the alternative; it would need a writable directory and leave a file behind.
    - In-memory SQLite: private to this process (and to the store's engine): no one to wait for.
    """
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:name || coalesce(current_schema(), '')))"),
                {"name": "pbs2p job store migration "},
            )
            yield conn
    elif engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        own = create_engine(engine.url, poolclass=NullPool, connect_args={"timeout": 30})
        event.listen(own, "connect", _no_driver_transactions)
        event.listen(own, "begin", _begin_immediate)
        try:
            with own.begin() as conn:
                yield conn
        finally:
            own.dispose()
    else:
        with engine.begin() as conn:
            yield conn


def _no_driver_transactions(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # pysqlite starts no transaction itself; _begin_immediate does


def _begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def _errors(engine: Engine) -> Iterator[None]:
    try:
        yield
    except OperationalError as exc:
        where = _where(engine)
        raise Pbs2pError(f"cannot open the job store at {where}: {exc.orig}; check PBS2P_DATABASE_URL") from exc


def _where(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
