"""Webhooks: a job's state changes POSTed to the `webhook_url` it was submitted with, signed, retried with backoff.

The body is JSON (`{"id", "type": "job.state_changed" | "job.deleted", "time", "job": {...}}`); the header
`X-Pbs2p-Signature: sha256=<hex>` is the HMAC-SHA256 of the exact body bytes under PBS2P_WEBHOOK_SECRET, and
`X-Pbs2p-Event` repeats the event id (the same on every retry: receivers drop repeats by it). A delivery that gets no
2xx (or no answer within 10 s) is tried again after 1, 2, 4, ... s, PBS2P_WEBHOOK_ATTEMPTS times in all.

The events wait in the job store's outbox (service/outbox.py), written in the transaction of the change they
report, so a process that makes a change (the API's request, a worker's job) sends nothing itself: the `Sender` of
each worker process claims due deliveries, one at a time and oldest first, and records each answer. A delivery
pending when a worker stops is sent by the next worker that runs (or by another one running beside it).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from urllib.parse import urlsplit

import httpx

from .jobstore import JobStore
from .outbox import Delivery
from .settings import Settings

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Pbs2p-Signature"
EVENT_HEADER = "X-Pbs2p-Event"
TIMEOUT_S = 10.0
PRUNE_S = (3600.0, 7 * 86400.0)  # how often finished deliveries are removed, and how long they are kept


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


class Sender:
    """Delivers the outbox's webhooks from a worker process (`owner`: the worker's name on its claims): a thread
    that claims a due delivery, POSTs it, records the answer, and polls every PBS2P_POLL_SECONDS when none is due."""

    def __init__(self, settings: Settings, store: JobStore, owner: str) -> None:
        self.secret, self.attempts = settings.webhook_secret, settings.webhook_attempts
        self.store, self.owner, self.poll = store, owner, settings.poll_seconds
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.delivered = 0  # events answered 2xx by this sender (for tests and logs)
        self.given_up = 0  # events this sender gave up after their last attempt

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pbs2p-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = TIMEOUT_S + 5) -> None:
        """Stop after the attempt under way (a claim not recorded by then is retried once its lease runs out)."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        last_prune = 0.0
        with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False, trust_env=False) as http:
            while not self.stopping.is_set():
                try:
                    if time.time() - last_prune >= PRUNE_S[0]:
                        last_prune = time.time()
                        self.store.outbox.prune(last_prune - PRUNE_S[1])
                    delivery = self.store.outbox.claim(self.owner, self.attempts)
                    if delivery is not None:
                        self._send(http, delivery)
                        continue
                except Exception:  # the store unreachable for a while: the rows wait in it
                    log.exception("webhooks: delivery round failed")
                self.stopping.wait(self.poll)

    def _send(self, http: httpx.Client, d: Delivery) -> None:
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, d.body),
                   EVENT_HEADER: d.event_id, "User-Agent": "pbs2p-webhooks"}  # fmt: skip
        error: str | None
        try:
            status = http.post(d.url, content=d.body, headers=headers).status_code
            error = None if 200 <= status < 300 else f"HTTP {status}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        outcome = self.store.outbox.record(d, self.owner, error, self.attempts)
        if outcome == "delivered":
            self.delivered += 1
        elif outcome == "given_up":
            self.given_up += 1
            log.warning("webhook %s to %s: given up after %d attempts (last: %s)", d.event_id, d.url, d.attempt, error)
        elif outcome == "retry":
            log.info("webhook %s to %s: attempt %d got %s; again in %g s", d.event_id, d.url, d.attempt, error,
                     2.0 ** (d.attempt - 1))  # fmt: skip
        else:
            log.warning("webhook %s: attempt %d outlasted its claim; its answer is not recorded", d.event_id, d.attempt)
