"""The webhook outbox: each state change of a job with a `webhook_url` writes its event, as a delivery row, in the
transaction of the change itself (`add`, called by the job store); worker processes deliver the rows (`Outbox`, used
by service/webhooks.py). A change and its delivery commit together or not at all, and a delivery outlives the
process that made the change and any worker that stops before it is answered.

A row is pending while `due_at` is set: the time of its next attempt. A worker claims a due row with a conditional
UPDATE (`attempts` is the row's version: it goes up by one at each claim, so two workers never claim the same attempt,
on PostgreSQL as on SQLite), which also moves `due_at` LEASE_S ahead: should the worker die before it records the
answer, another one tries again once the lease has run out. The answer is recorded by the claiming worker only:
`delivered_at`, or the next `due_at` after a backoff of 1, 2, 4, ... s, or `given_up_at` after the last attempt.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from .jobrecords import JobRow, WebhookDeliveryRow

LEASE_S = 30.0  # a claim's hold on its row: longer than one attempt (webhooks.TIMEOUT_S) with room to record it
R = WebhookDeliveryRow


# what an event says of its job: the state change's UPDATE returns them (`RETURNING`), no second read
EVENT_COLUMNS = (JobRow.id, JobRow.name, JobRow.state, JobRow.attempts, JobRow.error, JobRow.updated_at,
                 JobRow.deleted_at, JobRow.webhook_url)  # fmt: skip


def event_of(job: Any) -> dict[str, object]:
    """The event of `job`'s state change (`job`: a JobRow, a Job or a row of EVENT_COLUMNS)."""
    return {
        "id": "evt_" + secrets.token_hex(12),
        "type": "job.deleted" if job.deleted_at is not None else "job.state_changed",
        "time": time.time(),
        "job": {"id": job.id, "name": job.name, "state": str(job.state), "attempts": job.attempts,
                "error": job.error, "updated_at": job.updated_at, "links": {"self": f"/v1/jobs/{job.id}"}},
    }  # fmt: skip


def add(s: Session, job: Any) -> None:
    """In the transaction that changed `job`'s state (a JobRow, or a row of EVENT_COLUMNS): the delivery of the
    change's event, if the job has a webhook."""
    if not job.webhook_url:
        return
    event = event_of(job)
    now = time.time()
    body = json.dumps(event, separators=(",", ":"), sort_keys=True)  # ASCII: the exact bytes that are signed
    s.execute(
        insert(R).values(
            event_id=event["id"], job_id=job.id, url=job.webhook_url, body=body, created_at=now, due_at=now, attempts=0
        )
    )


@dataclass(frozen=True)
class Delivery:
    """One claimed attempt of a delivery."""

    seq: int
    event_id: str
    job_id: str
    url: str
    body: bytes
    attempt: int  # 1 for the first


class Outbox:
    """The delivery rows of a job store (`session`: its transactions)."""

    def __init__(self, session: Callable[[], AbstractContextManager[Session]]) -> None:
        self.session = session

    def claim(self, owner: str, max_attempts: int, now: float | None = None) -> Delivery | None:
        """The due delivery that has waited longest, leased to `owner` for its next attempt; None when none is due.
        A row whose last attempt was claimed but never recorded (its worker died) is given up once its lease ran
        out."""
        for _ in range(20):  # other workers may claim the chosen row first
            at = time.time() if now is None else now
            with self.session() as s:
                due = s.execute(
                    select(R.seq, R.attempts, R.last_error).where(R.due_at <= at).order_by(R.due_at, R.seq).limit(1)
                ).first()
            if due is None:
                return None
            same_attempt = (R.seq == due.seq, R.attempts == due.attempts, R.due_at <= at)
            with self.session() as s:
                if due.attempts >= max_attempts:
                    lost = f"attempt {due.attempts} got no recorded answer (its worker stopped)"
                    last = f"{lost}; before it: {due.last_error}" if due.last_error else lost
                    s.execute(update(R).where(*same_attempt).values(due_at=None, given_up_at=at, last_error=last))
                    continue
                won = s.execute(
                    update(R)
                    .where(*same_attempt)
                    .values(attempts=R.attempts + 1, due_at=at + LEASE_S, claimed_by=owner, last_attempt_at=at)
                ).rowcount  # type: ignore[attr-defined]
                if not won:
                    continue
                row = s.get_one(R, due.seq)
                return Delivery(row.seq, row.event_id, row.job_id, row.url, row.body.encode(), row.attempts)
        return None

    def record(self, d: Delivery, owner: str, error: str | None, max_attempts: int) -> str:
        """The answer to `d` (`error` None: a 2xx): `delivered`, `retry` (due again after 2^(attempt-1) s) or
        `given_up` (that was attempt `max_attempts`); `lost` when `owner` no longer holds the claim."""
        now = time.time()
        values: dict[str, Any]
        if error is None:
            outcome, values = "delivered", {"delivered_at": now, "due_at": None}
        elif d.attempt >= max_attempts:
            outcome, values = "given_up", {"given_up_at": now, "due_at": None, "last_error": error}
        else:
            outcome, values = "retry", {"due_at": now + 2.0 ** (d.attempt - 1), "last_error": error}
        with self.session() as s:
            q = update(R).where(R.seq == d.seq, R.claimed_by == owner, R.attempts == d.attempt, R.due_at.is_not(None))
            won = s.execute(q.values(**values)).rowcount  # type: ignore[attr-defined]
        return outcome if won else "lost"

    def deliveries(self, job_id: str | None = None) -> list[WebhookDeliveryRow]:
        """Every delivery row (of `job_id`), oldest first: for operators and tests."""
        with self.session() as s:
            q = select(R) if job_id is None else select(R).where(R.job_id == job_id)
            return list(s.scalars(q.order_by(R.seq)))

    def prune(self, finished_before: float) -> int:
        """Remove the rows delivered or given up before `finished_before`; how many."""
        with self.session() as s:
            done = func.coalesce(R.delivered_at, R.given_up_at)
            res = s.execute(delete(R).where(R.due_at.is_(None), done < finished_before))
            return int(res.rowcount)  # type: ignore[attr-defined]
