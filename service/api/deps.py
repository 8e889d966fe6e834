"""What routes get injected: the app's collaborators (settings, job store, storage, dispatcher), the caller's
tenant from its API key, and the caller's own job."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from pbs2p.workers.storage import Storage

from ..jobstore import Job, JobStore, hash_key
from ..settings import Settings
from .bodies import JobBodies
from .metrics import Metrics
from .problems import Problem

KEY_CACHE_S = 5.0


@dataclass
class AppState:
    """Everything the routes of one app share (kept as `app.state.pbs2p`)."""

    settings: Settings
    store: JobStore
    storage: Storage
    dispatcher: Any
    metrics: Metrics
    known_keys: dict[str, tuple[str, float]] = field(default_factory=dict)  # sha256 of a key -> (tenant, checked)
    bodies: JobBodies = field(default_factory=JobBodies)  # the hot routes' JSON, memoized by the job's row


async def app_state(request: Request) -> AppState:
    """The app's collaborators (async: FastAPI runs a plain function dependency in a thread, a hop per request)."""
    state: AppState = request.app.state.pbs2p
    return state


State = Annotated[AppState, Depends(app_state)]

bearer = HTTPBearer(auto_error=False, description="an API key (create one: pbs2p keys create TENANT)")


async def tenant(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The caller's tenant (also noted for the access log). Valid keys are remembered for KEY_CACHE_S (a revocation
    applies within that time), which spares a database read per request under load. (The app's state is read
    here, not injected: a sub-dependency less to solve on every request.)"""
    found = await _tenant_of(request.app.state.pbs2p, credentials)
    request.scope.setdefault("state", {})["tenant"] = found
    return found


async def _tenant_of(state: AppState, credentials: HTTPAuthorizationCredentials | None) -> str:
    key = credentials.credentials.strip() if credentials is not None else ""
    if not key:
        raise Problem(401, "Unauthorized", "send 'Authorization: Bearer <key>' (create one: pbs2p keys create)")
    cached = cached_tenant(state, key)
    if cached is not None:
        return cached
    known, digest, now = state.known_keys, hash_key(key), time.monotonic()
    found = await run_in_threadpool(state.store.tenant_for_key, key)
    if found is None:
        known.pop(digest, None)
        raise Problem(401, "Unauthorized", "the API key is not valid (unknown or revoked)")
    if len(known) > 10000:
        known.clear()
    known[digest] = (found, now)
    return found


def cached_tenant(state: AppState, key: str) -> str | None:
    """The tenant of `key` if it was found valid within KEY_CACHE_S, else None (not known, or to check again)."""
    hit = state.known_keys.get(hash_key(key)) if key else None
    return hit[0] if hit is not None and time.monotonic() - hit[1] < KEY_CACHE_S else None


Tenant = Annotated[str, Depends(tenant)]
JobId = Annotated[str, Path(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")]


def find_job(store: JobStore, job_id: str, who: str) -> Job:
    job = store.get(job_id, tenant=who)
    if job is None:
        raise not_found(job_id)
    return job


def find_row(store: JobStore, job_id: str, who: str) -> tuple[Any, ...]:
    """`find_job`'s row (for AppState.bodies)."""
    row = store.get_row(job_id, tenant=who)
    if row is None:
        raise not_found(job_id)
    return row


def not_found(job_id: str) -> Problem:
    return Problem(404, "Not found", f"no job {job_id}")  # another tenant's job is indistinguishable from no job


def own_job(state: State, job_id: JobId, who: Tenant) -> Job:
    """The caller's job `job_id` (404 for a missing job or another tenant's)."""
    return find_job(state.store, job_id, who)


OwnJob = Annotated[Job, Depends(own_job)]
