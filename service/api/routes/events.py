"""The tenant's event stream: one connection follows every job of the caller (the dashboard's list page)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from ..deps import State, Tenant
from ..problems import error_responses
from ..schemas import JobPublic

router = APIRouter(prefix="/v1", tags=["jobs"])
REPLAY_S = 10.0  # without `since`, the stream starts with the jobs changed in the last seconds (a reconnect's gap)
SKEW_S = 30.0  # how far apart the clocks of the hosts writing jobs (API, dispatchers) may be


@router.get(
    "/events",
    operation_id="follow_tenant_jobs",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"},
        **error_responses(401, 422),
    },
)
async def tenant_events(
    who: Tenant,
    state: State,
    since: Annotated[float | None, Query(ge=0, description="Unix time: start with jobs changed after it")] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events of every job of the caller: a `job` event with the job (as GET /v1/jobs/{id} has it)
    each time one changes, in the order of their changes; the stream does not end by itself. Without `since` it
    begins with the jobs changed in the last 10 s."""
    mark = time.time() - REPLAY_S if since is None else since
    interval = min(state.settings.poll_seconds, 1.0)
    sent: dict[str, float] = {}  # job id -> the updated_at last sent, for the jobs changed within SKEW_S of mark
    while True:
        # SKEW_S back from the newest change seen: a change stamped by a host whose clock is behind is not missed
        changed = await run_in_threadpool(state.store.changed_since, who, mark - SKEW_S, 1000)
        for job in changed:
            if sent.get(job.id) == job.updated_at:
                continue
            sent[job.id] = job.updated_at
            mark = max(mark, job.updated_at)
            yield ServerSentEvent(raw_data=JobPublic.of(job).model_dump_json(), event="job", id=f"{job.updated_at:.6f}")
        sent = {k: t for k, t in sent.items() if t >= mark - SKEW_S}
        await asyncio.sleep(interval)
