"""The job store: jobs and API keys in SQL (SQLite file by default, PostgreSQL by URL; same SQLAlchemy code).

Every state change is a compare-and-set (`UPDATE ... WHERE id = :id AND state IN (:expected)`): two
dispatchers, or a dispatcher and a cancel request, can never both win. The change of a job with a webhook writes
its event's delivery in the same transaction (the outbox, service/outbox.py; workers deliver it). API keys are
stored as sha256 hashes.

The schema is versioned by Alembic (service/migrations): opening a store upgrades its database to the newest
revision. A change to the models below goes with a new revision (tests/test_migrations.py checks they agree).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    create_engine,
    delete,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from . import migrations, outbox
from .jobreads import SEQ, JobReads, job_of
from .jobrecords import (
    ACTIVE,
    ApiKeyRow,
    IdempotencyConflict,
    Job,
    JobRow,
    JobState,
    QueueFull,
    dumps,
    hash_key,
)

log = logging.getLogger(__name__)
_ACTIVE = [a.value for a in ACTIVE]  # as stored in the state column
_TERMINAL = [st.value for st in JobState if st.terminal]


def make_engine(url: str) -> Engine:
    """The store's engine for `url` (SQLite: WAL, a busy timeout, the file's directory made; PostgreSQL: a pool)."""
    kwargs: dict[str, Any]
    if url.startswith("sqlite"):  # a local file: no stale connections; one per API thread (anyio's 40)
        kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}, "pool_size": 40}
    else:
        kwargs = {"pool_pre_ping": True, "pool_size": 10, "max_overflow": 20}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
        if engine.url.database not in (None, "", ":memory:"):
            Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    return engine


class JobStore:
    def __init__(self, url: str) -> None:
        """Open the store at `url`, upgrading its schema to the newest revision first (service/migrations: an
        empty database gets every revision, one made before migrations is stamped 0001 then upgraded)."""
        self.url = url
        self.engine: Engine = make_engine(url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self.outbox = outbox.Outbox(self.session)  # the webhook deliveries the state changes wrote
        self.reads = JobReads(self.engine)  # the hot reads (GET one job, a page of the list) without the ORM
        try:
            migrations.upgrade(self.engine)
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._session.begin() as s:
            yield s

    # -- API keys ---------------------------------------------------------------------------------------
    def create_key(self, tenant: str) -> str:
        """A new key for `tenant`; returned once, only its hash is stored."""
        key = "pbs2p_" + secrets.token_urlsafe(32)
        with self.session() as s:
            s.add(ApiKeyRow(tenant=tenant, key_hash=hash_key(key), prefix=key[:12], created_at=time.time()))
        return key

    def tenant_for_key(self, key: str) -> str | None:
        with self.session() as s:
            row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == hash_key(key)))
            return row.tenant if row is not None and row.revoked_at is None else None

    def revoke_key(self, prefix: str) -> int:
        with self.session() as s:
            res = s.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.prefix == prefix, ApiKeyRow.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
            return int(res.rowcount)  # type: ignore[attr-defined]

    # -- jobs -------------------------------------------------------------------------------------------
    def create_job(
        self,
        tenant: str,
        model: str,
        config: dict[str, Any],
        evaluate: dict[str, Any] | None = None,
        name: str | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        webhook_url: str | None = None,
        max_queued: int = 0,
    ) -> tuple[Job, bool]:
        """(job, created). With an idempotency key used before: the earlier job when the request is the same,
        IdempotencyConflict when it differs. With `max_queued` > 0, QueueFull when the tenant already has that many
        jobs queued (counted in the inserting transaction, under the tenant's lock: exact under concurrent submits)."""
        extra = [priority, webhook_url] if priority or webhook_url else []  # the hash of a plain job is as it was
        request_hash = hashlib.sha256(dumps([model, config, evaluate, name, *extra]).encode()).hexdigest()
        if idempotency_key is not None:
            earlier = self._by_idempotency(tenant, idempotency_key)
            if earlier is not None:
                return self._same_request(earlier, request_hash), False
        now = time.time()
        row = JobRow(
            id="job_" + secrets.token_hex(12),
            tenant=tenant,
            name=name,
            state=JobState.QUEUED.value,
            model=model,
            config=dumps(config),
            evaluate=dumps(evaluate) if evaluate is not None else None,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            created_at=now,
            updated_at=now,
            attempts=0,
            priority=priority,
            webhook_url=webhook_url,
        )
        try:
            with self.session() as s:
                if max_queued > 0:
                    self._lock_tenant(s, tenant)
                s.add(row)
                s.flush()
                if max_queued > 0 and self._queued(s, tenant) > max_queued:
                    raise QueueFull(tenant, max_queued)  # rolls the insert back
                outbox.add(s, row)  # the QUEUED event, committed with the job
                job = Job.of(row)
        except IntegrityError:  # a concurrent request with the same key won the insert
            if idempotency_key is None:
                raise
            earlier = self._by_idempotency(tenant, idempotency_key)
            if earlier is None:
                raise
            return self._same_request(earlier, request_hash), False
        return job, True

    def _lock_tenant(self, s: Session, tenant: str) -> None:
        """PostgreSQL: serialise this transaction with every other one counting `tenant`'s jobs against a limit
        (released at commit). SQLite needs none: its writers are serialised, and the counts follow the write."""
        if self.engine.dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": "pbs2p tenant " + tenant})

    @staticmethod
    def _queued(s: Session, tenant: str) -> int:
        q = select(func.count()).where(JobRow.tenant == tenant, JobRow.state == JobState.QUEUED.value)
        return int(s.scalar(q) or 0)

    def _by_idempotency(self, tenant: str, key: str) -> JobRow | None:
        with self.session() as s:
            return s.scalar(select(JobRow).where(JobRow.tenant == tenant, JobRow.idempotency_key == key))

    @staticmethod
    def _same_request(row: JobRow, request_hash: str) -> Job:
        if row.request_hash != request_hash:
            raise IdempotencyConflict(row.id)
        return Job.of(row)

    def get(self, job_id: str, tenant: str | None = None) -> Job | None:
        """The job; None when it does not exist, or (with `tenant`) belongs to another tenant or was deleted."""
        return self.reads.get(job_id, tenant)  # with `tenant`, a deleted job is gone at once

    def get_row(self, job_id: str, tenant: str | None = None) -> tuple[Any, ...] | None:
        """`get` as the job's row (jobreads.job_of makes it a `Job`): the API renders it, memoized by row."""
        return self.reads.get_row(job_id, tenant)

    def list_jobs(
        self, tenant: str, states: Iterable[JobState] = (), limit: int = 50, before: int | None = None
    ) -> tuple[list[Job], int | None]:
        """The tenant's jobs, newest first; (page, seq to pass as `before` for the next page or None)."""
        rows, last = self.list_rows(tenant, states, limit, before)
        return [job_of(r) for r in rows], last

    def list_rows(
        self, tenant: str, states: Iterable[JobState] = (), limit: int = 50, before: int | None = None
    ) -> tuple[list[tuple[Any, ...]], int | None]:
        """`list_jobs` as rows (jobreads.job_of makes each a `Job`): the API renders them, memoized by row."""
        wanted = sorted({st.value for st in states})
        rows = self.reads.page_rows(tenant, wanted, limit + 1, before)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1][SEQ] if more else None)

    def changed_since(self, tenant: str, since: float, limit: int = 200) -> list[Job]:
        """The tenant's jobs updated after `since` (not deleted), oldest change first: a tenant's event stream."""
        with self.session() as s:
            q = select(JobRow).where(JobRow.tenant == tenant, JobRow.updated_at > since, JobRow.deleted_at.is_(None))
            return [Job.of(r) for r in s.scalars(q.order_by(JobRow.updated_at).limit(limit))]

    def transition(
        self, job_id: str, expected: Iterable[JobState], new: JobState, owner: str | None = None, **values: Any
    ) -> bool:
        """Compare-and-set: move the job to `new` only if its state is one of `expected` (and, with `owner`,
        only if that dispatcher still owns it). Extra columns in `values` (dicts are stored as JSON)."""
        now = time.time()
        cols: dict[str, Any] = {k: (dumps(v) if isinstance(v, dict) else v) for k, v in values.items()}
        cols.update(state=new.value, updated_at=now)
        if new.terminal:
            cols.setdefault("finished_at", now)
        q = update(JobRow).where(JobRow.id == job_id, JobRow.state.in_([e.value for e in expected]))
        if owner is not None:
            q = q.where(JobRow.owner == owner)
        with self.session() as s:
            changed = s.execute(q.values(**cols).returning(*outbox.EVENT_COLUMNS)).first()
            if changed is not None:
                outbox.add(s, changed)
        return changed is not None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def mark_deleted(self, job_id: str, expected: Iterable[JobState], new: JobState) -> bool:
        """Compare-and-set to `new`, hiding the job from its tenant (it is removed once finished)."""
        return self.transition(job_id, expected, new, deleted_at=time.time())

    def remove(self, job_id: str) -> bool:
        """Delete the row of a finished job (its artifact and checkpoints are removed first, by the caller)."""
        with self.session() as s:
            res = s.execute(delete(JobRow).where(JobRow.id == job_id, JobRow.state.in_(_TERMINAL)))
            return bool(res.rowcount)  # type: ignore[attr-defined]

    def deleted_and_finished(self) -> list[Job]:
        """Jobs deleted while running whose run has ended: what is left to remove."""
        with self.session() as s:
            q = select(JobRow).where(JobRow.deleted_at.is_not(None), JobRow.state.in_(_TERMINAL))
            return [Job.of(r) for r in s.scalars(q.limit(100))]

    def expired_artifacts(self, finished_before: float) -> list[Job]:
        """Succeeded jobs finished before `finished_before` whose artifact is still there (oldest first)."""
        with self.session() as s:
            q = select(JobRow).where(
                JobRow.state == JobState.SUCCEEDED.value,
                JobRow.artifact.is_not(None),
                JobRow.artifact_expired_at.is_(None),
                JobRow.finished_at < finished_before,
            )
            return [Job.of(r) for r in s.scalars(q.order_by(JobRow.seq).limit(100))]

    def mark_artifact_expired(self, job_id: str) -> bool:
        with self.session() as s:
            q = update(JobRow).where(JobRow.id == job_id, JobRow.artifact_expired_at.is_(None))
            return bool(s.execute(q.values(artifact_expired_at=time.time())).rowcount)  # type: ignore[attr-defined]

    def claim(self, owner: str, max_running_per_tenant: int = 0) -> Job | None:
        """Take a queued job for `owner` (QUEUED -> RUNNING), fairly across tenants; None when nothing is claimable.

        The tenant served is the one with the fewest active jobs, then the least recently served (its newest
        `claimed_at`; never served first), then the one waiting longest (its oldest queued job); within it the job
        of highest `priority`, then the oldest.
        A tenant at `max_running_per_tenant` active jobs (> 0) is skipped. The claim is a compare-and-set on the
        job's state (two dispatchers never take the same job) which also checks the tenant's active count, under
        the tenant's lock on PostgreSQL (two dispatchers never together exceed the limit)."""
        for _ in range(20):  # other dispatchers may take the chosen job (or fill its tenant) first
            with self.session() as s:
                chosen = self._next_claim(s, max_running_per_tenant)
            if chosen is None:
                return None
            job_id, tenant = chosen
            now = time.time()
            with self.session() as s:
                if max_running_per_tenant > 0:
                    self._lock_tenant(s, tenant)
                q = update(JobRow).where(JobRow.id == job_id, JobRow.state == JobState.QUEUED.value)
                if max_running_per_tenant > 0:
                    q = q.where(self._active_of(tenant) < max_running_per_tenant)
                won = s.execute(
                    q.returning(*outbox.EVENT_COLUMNS).values(
                        state=JobState.RUNNING.value,
                        owner=owner,
                        heartbeat_at=now,
                        updated_at=now,
                        claimed_at=now,
                        started_at=func.coalesce(JobRow.started_at, now),
                        attempts=JobRow.attempts + 1,
                        error=None,
                    )
                ).first()
                if won is not None:
                    outbox.add(s, won)
            if won is not None:
                return self.get(job_id)
        return None

    @staticmethod
    def _active_of(tenant: str) -> Any:
        other = aliased(JobRow)
        return (
            select(func.count())
            .select_from(other)
            .where(other.tenant == tenant, other.state.in_(_ACTIVE))
            .scalar_subquery()
        )

    @staticmethod
    def _next_claim(s: Session, max_running_per_tenant: int) -> tuple[str, str] | None:
        """(job id, tenant) of the job `claim` should take now, or None."""
        waiting = dict(  # tenant -> its oldest queued job's seq
            s.execute(
                select(JobRow.tenant, func.min(JobRow.seq))
                .where(JobRow.state == JobState.QUEUED.value)
                .group_by(JobRow.tenant)
            ).all()
        )
        if not waiting:
            return None
        active = dict(
            s.execute(
                select(JobRow.tenant, func.count())
                .where(JobRow.state.in_(_ACTIVE), JobRow.tenant.in_(list(waiting)))
                .group_by(JobRow.tenant)
            ).all()
        )
        served = dict(
            s.execute(
                select(JobRow.tenant, func.max(JobRow.claimed_at))
                .where(JobRow.tenant.in_(list(waiting)))
                .group_by(JobRow.tenant)
            ).all()
        )
        order = sorted(waiting, key=lambda t: (active.get(t, 0), served.get(t) or 0.0, waiting[t]))
        for tenant in order:
            if max_running_per_tenant > 0 and active.get(tenant, 0) >= max_running_per_tenant:
                continue
            job_id = s.scalar(
                select(JobRow.id)
                .where(JobRow.tenant == tenant, JobRow.state == JobState.QUEUED.value)
                .order_by(JobRow.priority.desc(), JobRow.seq)
                .limit(1)
            )
            if job_id is not None:
                return job_id, tenant
        return None

    def heartbeat(self, owner: str, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        if not ids:
            return
        with self.session() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id.in_(ids), JobRow.owner == owner, JobRow.state.in_(_ACTIVE))
                .values(heartbeat_at=time.time())
            )

    def set_progress(self, job_id: str, owner: str, progress: dict[str, Any]) -> JobState | None:
        """Record progress if `owner` still runs the job; returns the job's state (CANCELLING asks the runner
        to stop), None when the job is no longer this owner's."""
        now = time.time()
        with self.session() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.owner == owner, JobRow.state.in_(_ACTIVE))
                .values(progress=dumps(progress), heartbeat_at=now, updated_at=now)
            )
            row = s.scalar(select(JobRow).where(JobRow.id == job_id))
        if row is None or row.owner != owner or JobState(row.state) not in ACTIVE:
            return None
        return JobState(row.state)

    def recover(self, lease_seconds: float, dead_owners: Iterable[str] = ()) -> list[str]:
        """Jobs whose dispatcher is gone (no heartbeat for `lease_seconds`, or an owner known dead) go back to
        the queue (they resume from their checkpoints); an orphaned cancel request completes. Returns the ids."""
        limit = time.time() - lease_seconds
        dead = list(dead_owners)
        with self.session() as s:
            stale = select(JobRow.id, JobRow.state).where(JobRow.state.in_(_ACTIVE))
            rows = [
                (r.id, r.state) for r in s.execute(stale.where((JobRow.heartbeat_at < limit) | JobRow.owner.in_(dead)))
            ]
        moved = []
        for job_id, state in rows:
            expected = [JobState(state)]
            if state == JobState.CANCELLING.value:
                ok = self.transition(job_id, expected, JobState.CANCELLED, owner=None)
            else:
                ok = self.transition(job_id, expected, JobState.QUEUED, owner=None, progress={"stage": "requeued"})
            if ok:
                moved.append(job_id)
        return moved

    def owners(self) -> list[str]:
        with self.session() as s:
            q = select(JobRow.owner).where(JobRow.state.in_(_ACTIVE)).distinct()
            return [o for o in s.scalars(q) if o is not None]

    def counts(self) -> dict[str, int]:
        """Jobs per state (for /metrics)."""
        with self.session() as s:
            rows = s.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all()
        out = {st.value: 0 for st in JobState}
        out.update({state: int(n) for state, n in rows})
        return out

    def active_by_tenant(self) -> dict[tuple[str, str], int]:
        """(tenant, state) -> jobs, for the queued and active states (for /metrics: queue depth per tenant)."""
        wanted = [JobState.QUEUED.value, *_ACTIVE]
        with self.session() as s:
            q = select(JobRow.tenant, JobRow.state, func.count()).where(JobRow.state.in_(wanted))
            rows = s.execute(q.group_by(JobRow.tenant, JobRow.state)).all()
        return {(tenant, state): int(n) for tenant, state, n in rows}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for the dispatcher's writes
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
