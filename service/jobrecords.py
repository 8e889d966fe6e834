"""The job store's records: job states, the tables (API keys, jobs, webhook deliveries) as the code reads and writes
them (the database gets them from the revisions in service/migrations), the detached `Job` snapshot, and list
cursors. `jobstore.py` holds the store.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    UPLOADING = "UPLOADING"
    CANCELLING = "CANCELLING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


ACTIVE = (JobState.RUNNING, JobState.UPLOADING, JobState.CANCELLING)  # owned by a dispatcher


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with another request body."""


class QueueFull(Exception):
    """The tenant already has its limit of queued jobs."""

    def __init__(self, tenant: str, limit: int) -> None:
        super().__init__(f"tenant {tenant} has {limit} queued jobs (the limit)")
        self.tenant, self.limit = tenant, limit


class Base(DeclarativeBase):
    pass


# The tables as the code reads and writes them; the database gets them from the revisions in service/migrations.
class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings; the key itself is never stored
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_tenant_seq", "tenant", "seq"),
        Index("ix_jobs_state_seq", "state", "seq"),
        Index("ix_jobs_tenant_claimed", "tenant", "claimed_at"),
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # creation order
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(Text)
    config: Mapped[str] = mapped_column(Text)  # JSON of CompressionConfig.to_dict()
    evaluate: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)  # dispatcher running it
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: stage, block, blocks, eta_s
    report: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: metrics, timings, per block N, bits
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    artifact: Mapped[str | None] = mapped_column(Text, nullable=True)  # storage prefix once SUCCEEDED
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # higher first, within a tenant
    claimed_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # last claim (when its tenant was served)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    artifact_expired_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # removed by retention
    deleted_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # DELETE while running: hidden, then gone


class WebhookDeliveryRow(Base):
    """One webhook event and its delivery (the outbox, service/outbox.py): pending while `due_at` is set."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "due_at"), Index("ix_webhook_deliveries_job", "job_id"))
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(40), unique=True)  # X-Pbs2p-Event, the body's "id"
    job_id: Mapped[str] = mapped_column(String(40))  # no foreign key: the event outlives a removed job
    url: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)  # the JSON exactly as it is sent and signed
    created_at: Mapped[float] = mapped_column(Float)
    due_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # next attempt (or end of a claim's lease)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # claimed so far
    claimed_by: Mapped[str | None] = mapped_column(String(200), nullable=True)  # the worker of the last attempt
    last_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)  # what the last failed attempt got
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # answered 2xx
    given_up_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # every attempt failed


@dataclass(frozen=True)
class Job:
    """A job as read from the store (a detached snapshot)."""

    id: str
    seq: int
    tenant: str
    name: str | None
    state: JobState
    model: str
    config: dict[str, Any]
    evaluate: dict[str, Any] | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    owner: str | None
    heartbeat_at: float | None
    progress: dict[str, Any]
    report: dict[str, Any]
    error: str | None
    artifact: str | None
    priority: int = 0
    claimed_at: float | None = None
    webhook_url: str | None = None
    artifact_expired_at: float | None = None
    deleted_at: float | None = None

    @classmethod
    def of(cls, r: JobRow) -> Job:
        return cls(
            id=r.id,
            seq=r.seq,
            tenant=r.tenant,
            name=r.name,
            state=JobState(r.state),
            model=r.model,
            config=json.loads(r.config),
            evaluate=json.loads(r.evaluate) if r.evaluate else None,
            created_at=r.created_at,
            updated_at=r.updated_at,
            started_at=r.started_at,
            finished_at=r.finished_at,
            attempts=r.attempts,
            owner=r.owner,
            heartbeat_at=r.heartbeat_at,
            progress=json.loads(r.progress) if r.progress else {},
            report=json.loads(r.report) if r.report else {},
            error=r.error,
            artifact=r.artifact,
            priority=r.priority or 0,
            claimed_at=r.claimed_at,
            webhook_url=r.webhook_url,
            artifact_expired_at=r.artifact_expired_at,
            deleted_at=r.deleted_at,
        )


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def dumps(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): the stored form of a job's JSON columns."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The seq a cursor points below; ValueError for anything this store did not hand out."""
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    if not raw.startswith("s") or not raw[1:].isdigit():
        raise ValueError("not a cursor")
    seq = int(raw[1:])
    if seq > 2**63 - 1:  # no row has it; the database would refuse the number (a 500 instead of a 422)
        raise ValueError("not a cursor")
    return seq
