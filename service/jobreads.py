"""The job store's hot reads (GET one job, a page of the list): SQL compiled once per statement shape, run on the
pooled DBAPI connection, rows made into `Job`s directly (or given to the API as they are: it renders a row's JSON
once and answers the same row again with the same bytes, service/api/bodies.py).

The same queries through an ORM session cost ~10x more CPU (statement construction, cache key, unit of work,
identity map: ~1-2 ms against ~0.1-0.2 ms per read here); under 200 polling clients that was most of a request.
The SQL is SQLAlchemy's own compilation of the Core statements below, for the engine's dialect, so SQLite and
PostgreSQL get their own parameter style; only the values change between calls.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Engine
from sqlalchemy.sql import Select

from .jobrecords import Job, JobRow, JobState

_T = JobRow.__table__.c  # type: ignore[attr-defined]
_COLUMNS = tuple(c.name for c in _T)


class _Compiled:
    """One statement compiled for one dialect: its SQL and how its parameters are passed (positional or named)."""

    def __init__(self, stmt: Select[Any], engine: Engine) -> None:
        compiled = stmt.compile(dialect=engine.dialect)
        self.sql = compiled.string
        self.names = list(compiled.positiontup or []) if compiled.positional else None
        self.fixed = compiled.params  # the values compiled in (the LIMIT), by name; `values` give the others

    def params(self, values: dict[str, Any]) -> Sequence[Any] | dict[str, Any]:
        merged = {**self.fixed, **values}
        return tuple(merged[n] for n in self.names) if self.names is not None else merged


class JobReads:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._compiled: dict[tuple[Any, ...], _Compiled] = {}

    def _run(self, shape: tuple[Any, ...], build: Any, values: dict[str, Any]) -> list[tuple[Any, ...]]:
        c = self._compiled.get(shape)
        if c is None:
            c = self._compiled[shape] = _Compiled(build(), self.engine)
        conn = self.engine.raw_connection()
        try:
            cur = conn.cursor()
            try:
                cur.execute(c.sql, c.params(values))
                rows = cur.fetchall()
            finally:
                cur.close()
        finally:
            conn.close()  # back to the pool, which ends the read transaction (its reset on return)
        return [tuple(r) for r in rows]

    def get(self, job_id: str, tenant: str | None) -> Job | None:
        row = self.get_row(job_id, tenant)
        return job_of(row) if row is not None else None

    def get_row(self, job_id: str, tenant: str | None) -> tuple[Any, ...] | None:
        """The job's row (all the table's columns, in table order; `job_of` makes it a `Job`), or None."""

        def build() -> Select[Any]:
            q = select(*_T).where(_T.id == bindparam("id"))
            if tenant is not None:
                q = q.where(_T.tenant == bindparam("tenant"), _T.deleted_at.is_(None))
            return q

        values: dict[str, Any] = {"id": job_id} if tenant is None else {"id": job_id, "tenant": tenant}
        rows = self._run(("get", tenant is None), build, values)
        return rows[0] if rows else None

    def page_rows(self, tenant: str, states: Sequence[str], limit: int, before: int | None) -> list[tuple[Any, ...]]:
        """The rows of up to `limit` jobs of `tenant` (not deleted), newest first, with seq below `before` when
        given."""

        def build() -> Select[Any]:
            q = select(*_T).where(_T.tenant == bindparam("tenant"), _T.deleted_at.is_(None))
            if states:
                q = q.where(_T.state.in_([bindparam(f"s{i}") for i in range(len(states))]))
            if before is not None:
                q = q.where(_T.seq < bindparam("before"))
            return q.order_by(_T.seq.desc()).limit(limit)

        values: dict[str, Any] = {"tenant": tenant, **{f"s{i}": s for i, s in enumerate(states)}}
        if before is not None:
            values["before"] = before
        return self._run(("page", len(states), before is None, limit), build, values)


SEQ = _COLUMNS.index("seq")  # where a row holds its job's seq (the list's cursor)


def job_of(row: tuple[Any, ...]) -> Job:
    """A `Job` from a row of all the table's columns, in table order."""
    r = dict(zip(_COLUMNS, row, strict=True))
    return Job(
        id=r["id"],
        seq=r["seq"],
        tenant=r["tenant"],
        name=r["name"],
        state=JobState(r["state"]),
        model=r["model"],
        config=json.loads(r["config"]),
        evaluate=json.loads(r["evaluate"]) if r["evaluate"] else None,
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        attempts=r["attempts"],
        owner=r["owner"],
        heartbeat_at=r["heartbeat_at"],
        progress=json.loads(r["progress"]) if r["progress"] else {},
        report=json.loads(r["report"]) if r["report"] else {},
        error=r["error"],
        artifact=r["artifact"],
        priority=r["priority"] or 0,
        claimed_at=r["claimed_at"],
        webhook_url=r["webhook_url"],
        artifact_expired_at=r["artifact_expired_at"],
        deleted_at=r["deleted_at"],
    )
