"""Jobs: submit, list, read, report, cancel, delete, follow (server-sent events)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from pbs2p.core.errors import Pbs2pError
from pbs2p.workers.evaluation import check_tasks
from pbs2p.workers.model_refs import check_model_ref, check_text, with_revision

from ... import lifecycle
from ...jobrecords import ACTIVE, IdempotencyConflict, JobState, QueueFull, decode_cursor, encode_cursor
from ...webhooks import check_webhook_url
from ..bodies import NOT_MODIFIED, conditional, etag_of
from ..deps import AppState, JobId, OwnJob, State, Tenant, find_job, find_row
from ..problems import Problem, error_responses, invalid_field
from ..schemas import JobCreate, JobList, JobPublic, JobReport

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
QUEUE_FULL_RETRY_S = 30  # Retry-After of a 429: about when a queued job may have started


def job_options(body: JobCreate, state: AppState) -> dict[str, Any]:
    """What `create_job` takes besides the job itself: its priority, its webhook URL (checked: 422 when webhooks
    are off or the host is not allowed) and the tenant's queue limit."""
    webhook_url = None
    if body.webhook_url is not None:
        try:
            webhook_url = check_webhook_url(body.webhook_url, state.settings)
        except ValueError as exc:
            raise invalid_field("webhook_url", str(exc)) from None
    return {"priority": body.priority, "webhook_url": webhook_url, "max_queued": state.settings.tenant_max_queued_jobs}


def queue_full(exc: QueueFull) -> Problem:
    return Problem(
        429,
        "Too many queued jobs",
        f"this tenant already has {exc.limit} jobs queued (PBS2P_TENANT_MAX_QUEUED_JOBS); submit again once some "
        f"have started (Retry-After: {QUEUE_FULL_RETRY_S} s), or cancel queued ones",
        headers={"Retry-After": str(QUEUE_FULL_RETRY_S)},
    )


@router.post(
    "",
    operation_id="submit_job",
    status_code=201,
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "Replayed: the job of an earlier request with this key"},
        **error_responses(400, 401, 409, 413, 422, 429),
    },
)
def submit(
    body: JobCreate,
    who: Tenant,
    state: State,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """Queue a compression job. The same Idempotency-Key with the same body returns the same job. A Hugging Face
    id is checked against the hub's metadata (exists, readable, safetensors, no remote code, size) before it is
    queued; a hub that cannot be reached is no refusal (the job tries when it runs)."""
    roots = state.settings.roots
    try:
        model = with_revision(body.model, body.revision)
    except Pbs2pError as exc:
        raise invalid_field("revision", str(exc)) from None
    try:
        model = check_model_ref(model, roots, state.settings)
    except Pbs2pError as exc:
        raise invalid_field("model", str(exc)) from None
    texts = [("config.calib", body.config.calib)] if body.config.calib != "wiki" else []
    if body.evaluate is not None:
        texts.append(("evaluate.data", body.evaluate.data))
    for field, ref in texts:
        try:
            check_text(ref, roots)
        except Pbs2pError as exc:
            raise invalid_field(field, str(exc)) from None
    if body.evaluate is not None and body.evaluate.tasks:
        try:
            check_tasks(body.evaluate.tasks, state.settings.tasks_dir)
        except Pbs2pError as exc:  # unknown, without data here, or the service lacks the tasks extra
            raise invalid_field("evaluate.tasks", str(exc)) from None
    evaluate = None
    if body.evaluate is not None:  # without tasks, stored as before they existed (the same request hash)
        evaluate = body.evaluate.model_dump(exclude=set() if body.evaluate.tasks else {"tasks", "tasks_limit"})
    try:
        job, created = state.store.create_job(
            who, model, body.config.to_dict(), evaluate, body.name, idempotency_key, **job_options(body, state)
        )
    except QueueFull as exc:
        raise queue_full(exc) from None
    except IdempotencyConflict as exc:
        raise Problem(
            409,
            "Idempotency-Key reused",
            f"Idempotency-Key {idempotency_key!r} was used for job {exc} with another body; "
            f"use a new key for a new job",
        ) from None
    response = json_response(JobPublic.of(job), 201 if created else 200)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return response


IfNoneMatch = Annotated[
    str | None, Header(description="the ETag of a body read before: 304 (no body) while it is still the same")
]


@router.get(
    "", operation_id="list_jobs", response_model=JobList, responses={**NOT_MODIFIED, **error_responses(401, 422)}
)
async def list_jobs(
    who: Tenant,
    state: State,
    job_state: Annotated[list[JobState] | None, Query(alias="state")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """The caller's jobs (summaries: no per-block report), newest first; filter by one or more `state`s, page with
    `cursor`. The ETag changes when the page would; If-None-Match with it: 304 while it has not."""
    before = None
    if cursor:
        try:
            before = decode_cursor(cursor)
        except ValueError:
            raise invalid_field("cursor", "not a cursor returned by this API; omit it for the first page") from None
    rows, last = await run_in_threadpool(state.store.list_rows, who, job_state or (), limit, before)
    cursor = encode_cursor(last) if last else None
    body = state.bodies.page(rows, cursor)  # JobList's JSON
    return conditional(body, etag_of(body), if_none_match)


@router.get(
    "/{job_id}",
    operation_id="get_job",
    response_model=JobPublic,
    responses={**NOT_MODIFIED, **error_responses(401, 404, 422)},
)
async def get_job(job_id: JobId, who: Tenant, state: State, if_none_match: IfNoneMatch = None) -> Response:
    """The job: state, progress, metrics, timings, per-block report, error. The ETag changes when the job does;
    poll with If-None-Match: 304 (no body) while it has not changed."""
    row = await run_in_threadpool(find_row, state.store, job_id, who)
    body, etag = state.bodies.job(row)  # JobPublic's JSON
    return conditional(body, etag, if_none_match)


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    """The model's JSON as the response, as `response_model` documents it: the route skips FastAPI's second
    validation and serialisation of a model built from the store (one thread hop per request instead of three;
    the two reads above answer with bytes rendered once per row, AppState.bodies)."""
    return Response(model.model_dump_json(), status_code, media_type="application/json")


@router.get(
    "/{job_id}/report",
    operation_id="get_job_report",
    response_model=JobReport,
    responses=error_responses(401, 404, 409, 422),
)
def get_report(job: OwnJob) -> JobReport:
    """The report of a job that SUCCEEDED: its metrics (perplexity before/after, paper and true bits, mean layer
    error), timings, and per block N, the CFS cosine and each linear's error and bits (kept when retention
    removes the artifact). 409 for a job without one (not SUCCEEDED)."""
    if job.state != JobState.SUCCEEDED or not job.report:
        raise Problem(409, "No report", f"job {job.id} is {job.state.value}; a job has a report once it has SUCCEEDED")
    return JobReport.of(job)


@router.post(
    "/{job_id}/cancel",
    operation_id="cancel_job",
    response_model=JobPublic,
    responses=error_responses(401, 404, 409, 422),
)
def cancel(job: OwnJob, who: Tenant, state: State) -> JobPublic:
    """A queued job is cancelled at once; a running one stops at its next block (CANCELLING)."""
    store = state.store
    if job.state == JobState.QUEUED and store.transition(job.id, [JobState.QUEUED], JobState.CANCELLED):
        return JobPublic.of(find_job(store, job.id, who))
    if job.state in (JobState.RUNNING, JobState.UPLOADING) and store.transition(
        job.id, [job.state], JobState.CANCELLING
    ):
        return JobPublic.of(find_job(store, job.id, who))
    job = find_job(store, job.id, who)
    if job.state in (JobState.CANCELLING, JobState.CANCELLED):
        return JobPublic.of(job)
    raise Problem(409, "Job already finished", f"job {job.id} is {job.state.value}; it cannot be cancelled")


@router.delete(
    "/{job_id}",
    operation_id="delete_job",
    status_code=204,
    response_class=Response,
    responses={
        202: {"description": "The job was running: it is cancelled, then removed (already 404 for this tenant)"},
        204: {"description": "Removed: the job, its artifact and its checkpoints"},
        **error_responses(401, 404, 422),
    },
)
def delete_job(job: OwnJob, state: State) -> Response:
    """Delete the job, its artifact and its checkpoints; a running job is cancelled first (202), then removed by
    its dispatcher. Either way the job is 404 from now on."""
    store = state.store
    for _ in range(5):  # the job may move on between the read and the compare-and-set
        if job.state in ACTIVE:
            if store.mark_deleted(job.id, [job.state], JobState.CANCELLING):
                return Response(status_code=202)
        elif store.mark_deleted(job.id, [job.state], JobState.CANCELLED if job.state == JobState.QUEUED else job.state):
            gone = store.get(job.id)
            if gone is not None:
                lifecycle.purge(store, state.storage, lifecycle.checkpoints_of(state.settings), gone)
            return Response(status_code=204)  # files the storage refused now go in the next maintenance round
        current = store.get(job.id)
        if current is None:
            break
        job = current
    raise Problem(409, "Job changing", f"job {job.id} changed state while being deleted; try again")


@router.get(
    "/{job_id}/events",
    operation_id="follow_job",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"},
        **error_responses(401, 404, 422),
    },
)
async def events(job: OwnJob, job_id: JobId, who: Tenant, state: State) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: a `job` event with the job each time its state or progress changes; an `end` event
    once the job reaches a final state, then the stream ends."""
    last = ""
    interval = min(state.settings.poll_seconds, 1.0)
    while True:
        current = await run_in_threadpool(state.store.get, job_id, who)
        if current is None:
            return
        body = JobPublic.of(current).model_dump_json()
        if body != last:
            last = body
            yield ServerSentEvent(raw_data=body, event="job", id=f"{current.updated_at:.6f}")
        if current.state.terminal:
            yield ServerSentEvent(data={"state": current.state.value}, event="end")
            return
        await asyncio.sleep(interval)
