"""Webhooks: a job's state changes POSTed to the `webhook_url` it was submitted with, signed, retried with backoff.

The body is JSON (`{"id", "type": "job.state_changed" | "job.deleted", "time", "job": {...}}`); the header
`X-Pbs2p-Signature: sha256=<hex>` is the HMAC-SHA256 of the exact body bytes under PBS2P_WEBHOOK_SECRET, and
`X-Pbs2p-Event` repeats the event id (the same on every retry: receivers drop repeats by it). A delivery that gets no
2xx (or no answer within 10 s) is tried again after 1, 2, 4, ... s, PBS2P_WEBHOOK_ATTEMPTS times in all; events of
one process are sent from one thread, in order of their due time. Deliveries pending when the process stops are
lost (logged): a receiver that must not miss a state reads the job from the API.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from .jobstore import Job
from .settings import Settings

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Pbs2p-Signature"
EVENT_HEADER = "X-Pbs2p-Event"
TIMEOUT_S = 10.0


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def check_webhook_url(url: str, settings: Settings) -> str:
    """The URL if webhooks may be sent to it; ValueError saying what to change."""
    if not settings.webhook_secret:
        raise ValueError("webhooks are off on this service (PBS2P_WEBHOOK_SECRET is not set); omit webhook_url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("use an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("no credentials in the URL; the body is signed instead (X-Pbs2p-Signature)")
    allowed = [h.strip().lower() for h in settings.webhook_hosts.split(",") if h.strip()]
    if allowed and parts.hostname.lower() not in allowed:
        raise ValueError(f"host {parts.hostname!r} is not one of the service's webhook hosts ({', '.join(allowed)})")
    return url


def event_of(job: Job) -> dict[str, object]:
    return {
        "id": "evt_" + secrets.token_hex(12),
        "type": "job.deleted" if job.deleted_at is not None else "job.state_changed",
        "time": time.time(),
        "job": {"id": job.id, "name": job.name, "state": job.state.value, "attempts": job.attempts,
                "error": job.error, "updated_at": job.updated_at, "links": {"self": f"/v1/jobs/{job.id}"}},
    }  # fmt: skip


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    url: str = field(compare=False)
    body: bytes = field(compare=False)
    event_id: str = field(compare=False)
    attempt: int = field(compare=False, default=1)


class Notifier:
    """Sends the webhooks of one process: `job_changed` (a JobStore listener) queues, a thread delivers."""

    def __init__(self, settings: Settings) -> None:
        self.secret, self.attempts = settings.webhook_secret, settings.webhook_attempts
        self._queue: list[_Delivery] = []
        self._cv = threading.Condition()
        self._seq = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.delivered = 0  # events answered 2xx (for tests and logs)
        self.given_up = 0  # events dropped after every attempt

    def job_changed(self, job: Job) -> None:
        if not job.webhook_url or not self.secret:
            return
        event = event_of(job)
        body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
        self._push(_Delivery(time.monotonic(), 0, job.webhook_url, body, str(event["id"])))

    def _push(self, delivery: _Delivery) -> None:
        with self._cv:
            self._seq += 1
            delivery.seq = self._seq
            heapq.heappush(self._queue, delivery)
            self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pbs2p-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._queue:
            log.warning("webhooks: %d deliveries pending at shutdown are dropped", len(self._queue))

    def _run(self) -> None:
        with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False, trust_env=False) as http:
            while True:
                with self._cv:
                    while not self._stopping and (not self._queue or self._queue[0].due > time.monotonic()):
                        self._cv.wait(None if not self._queue else max(0.0, self._queue[0].due - time.monotonic()))
                    if self._stopping:
                        return
                    delivery = heapq.heappop(self._queue)
                self._send(http, delivery)

    def _send(self, http: httpx.Client, d: _Delivery) -> None:
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, d.body),
                   EVENT_HEADER: d.event_id, "User-Agent": "pbs2p-webhooks"}  # fmt: skip
        try:
            status: int | str = http.post(d.url, content=d.body, headers=headers).status_code
        except httpx.HTTPError as exc:
            status = f"{type(exc).__name__}: {exc}"
        if isinstance(status, int) and 200 <= status < 300:
            self.delivered += 1
            return
        if d.attempt >= self.attempts:
            self.given_up += 1
            log.warning("webhook %s to %s: given up after %d attempts (last: %s)", d.event_id, d.url, d.attempt, status)
            return
        delay = 2.0 ** (d.attempt - 1)
        log.info("webhook %s to %s: attempt %d got %s; again in %g s", d.event_id, d.url, d.attempt, status, delay)
        self._push(_Delivery(time.monotonic() + delay, 0, d.url, d.body, d.event_id, d.attempt + 1))
