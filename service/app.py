"""The HTTP API (FastAPI): jobs under /v1 behind `Authorization: Bearer <key>`, errors as RFC 9457 problems.

Routes are thin: they validate, call the store / storage given to `create_app`, and map domain errors to HTTP.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pbs2p_core.config import CompressionConfig
from pbs2p_core.errors import Pbs2pError
from workers.storage import LocalStorage, ObjectNotFound, Storage, StorageError, check_key, join_key

from .dashboard import mount_dashboard
from .models import check_model, check_text
from .schemas import ArtifactFile, ArtifactPublic, JobCreate, JobList, JobPublic, ProblemDetails
from .settings import Settings
from .store import IdempotencyConflict, Job, JobState, Store, decode_cursor, encode_cursor, hash_key

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
KEY_CACHE_S = 5.0
PROBLEM = "application/problem+json"


class Problem(Exception):
    """An RFC 9457 problem: raised by routes, rendered by the handler below."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra


def problem_response(status: int, title: str, detail: str, instance: str = "", **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "instance": instance, **extra}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


class BodyLimit:
    """413 for a body above `limit` bytes, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._too_large(scope, send)
        if declared is not None or b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # the server reads exactly Content-Length bytes (or none)
        # A streamed (chunked) body is read here, up to the limit, before the app sees it. (Raising from inside
        # the app's `receive` does not work: the http middleware wraps the error in an ExceptionGroup and FastAPI
        # answers any error while it reads the body with a 400.)
        messages: list[Message] = []
        seen = 0
        while True:
            msg = await receive()
            messages.append(msg)
            if msg["type"] != "http.request":
                break
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                return await self._too_large(scope, send)
            if not msg.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        resp = problem_response(
            413, "Request body too large", f"the body exceeds {self.limit} bytes (PBS2P_MAX_BODY_BYTES)", scope["path"]
        )
        await resp(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class Measure:
    """Counts requests by route template and status, and times them (plain ASGI: ~1 ms cheaper per request than
    an `@app.middleware("http")` function)."""

    def __init__(self, app: ASGIApp, metrics: "Metrics") -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t, status = time.perf_counter(), 500

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")  # set by the router once it matched
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - t)


class Metrics:
    """Prometheus metrics of one app: requests by route and status, latency, jobs by state (read at scrape)."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pbs2p_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "pbs2p_http_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        store_ref = store

        class Jobs:
            def collect(self) -> Any:
                g = GaugeMetricFamily("pbs2p_jobs", "Jobs in the store by state", labels=["state"])
                for state, n in store_ref.counts().items():
                    g.add_metric([state], n)
                yield g

            def describe(self) -> list[Any]:
                return []

        self.registry.register(Jobs())  # type: ignore[arg-type]


def create_app(settings: Settings, store: Store, storage: Storage, dispatcher: Any = None) -> FastAPI:
    """The API over `store` and `storage`; `dispatcher` (optional) is started and stopped with the app."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if dispatcher is not None:
            dispatcher.start()
        try:
            yield
        finally:
            if dispatcher is not None:
                await run_in_threadpool(dispatcher.stop)

    app = FastAPI(
        title="pbs2p",
        version="1",
        summary="PBS²P compression jobs: 1-bit weights on N:M sparsity for LLMs",
        lifespan=lifespan,
    )
    metrics = Metrics(store)
    roots = settings.roots

    # -- errors as problem details ------------------------------------------------------------------------
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.title, exc.detail, request.url.path, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": _fix_hint(e)} for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors)
        return problem_response(422, "Invalid request", detail, request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(exc.status_code, str(exc.detail), str(exc.detail), request.url.path)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Measure, metrics=metrics)

    # -- auth -----------------------------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="an API key (create one: pbs2p keys create TENANT)")

    known: dict[str, tuple[str, float]] = {}  # sha256 of a valid key -> (tenant, when checked)

    async def tenant(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        """The caller's tenant. Valid keys are remembered for KEY_CACHE_S (a revocation applies within that
        time), which spares a database read per request under load."""
        key = credentials.credentials.strip() if credentials is not None else ""
        if not key:
            raise Problem(401, "Unauthorized", "send 'Authorization: Bearer <key>' (create one: pbs2p keys create)")
        digest, now = hash_key(key), time.monotonic()
        hit = known.get(digest)
        if hit is not None and now - hit[1] < KEY_CACHE_S:
            return hit[0]
        found = await run_in_threadpool(store.tenant_for_key, key)
        if found is None:
            known.pop(digest, None)
            raise Problem(401, "Unauthorized", "the API key is not valid (unknown or revoked)")
        if len(known) > 10000:
            known.clear()
        known[digest] = (found, now)
        return found

    Tenant = Annotated[str, Depends(tenant)]
    JobId = Annotated[str, Path(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")]

    def own_job(job_id: str, who: str) -> Job:
        job = store.get(job_id, tenant=who)
        if job is None:  # another tenant's job is indistinguishable from no job
            raise Problem(404, "Not found", f"no job {job_id}")
        return job

    # -- routes ---------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, Any]:
        store.counts()  # the database answers
        return {"status": "ok", "dispatcher": dispatcher is not None and dispatcher.alive()}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/jobs",
        status_code=201,
        response_model=JobPublic,
        tags=["jobs"],
        responses={
            200: {"model": JobPublic, "description": "Replayed: the job of an earlier request with this key"},
            **_errors(400, 401, 409, 413, 422),
        },
    )
    def submit(
        body: JobCreate,
        who: Tenant,
        response: Response,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> JobPublic:
        """Queue a compression job. The same Idempotency-Key with the same body returns the same job."""
        try:
            model = check_model(body.model, roots)
        except Pbs2pError as exc:
            raise _invalid_field("model", str(exc)) from None
        given = body.config.model_dump(exclude_none=True)
        try:
            cfg = CompressionConfig.from_dict(given)
        except Pbs2pError as exc:
            raise _invalid_field(_field_named(str(exc), given, "config"), str(exc)) from None
        if cfg.calib != "wiki":
            try:
                check_text(cfg.calib, roots)
            except Pbs2pError as exc:
                raise _invalid_field("config.calib", str(exc)) from None
        evaluate = body.evaluate.model_dump() if body.evaluate is not None else None
        if evaluate is not None:
            try:
                check_text(evaluate["data"], roots)
            except Pbs2pError as exc:
                raise _invalid_field("evaluate.data", str(exc)) from None
        try:
            job, created = store.create_job(who, model, cfg.to_dict(), evaluate, body.name, idempotency_key)
        except IdempotencyConflict as exc:
            raise Problem(
                409,
                "Idempotency-Key reused",
                f"Idempotency-Key {idempotency_key!r} was used for job {exc} with another body; "
                f"use a new key for a new job",
            ) from None
        if not created:
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return JobPublic.of(job)

    @app.get("/v1/jobs", response_model=JobList, tags=["jobs"], responses=_errors(401, 422))
    def list_jobs(
        who: Tenant,
        state: Annotated[list[JobState] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(max_length=64)] = None,
    ) -> JobList:
        """The caller's jobs, newest first; filter by one or more `state`s, page with `cursor`."""
        before = None
        if cursor:
            try:
                before = decode_cursor(cursor)
            except ValueError:
                raise _invalid_field(
                    "cursor", "not a cursor returned by this API; omit it for the first page"
                ) from None
        jobs, last = store.list_jobs(who, state or (), limit, before)
        return JobList(jobs=[JobPublic.of(j) for j in jobs], next_cursor=encode_cursor(last) if last else None)

    @app.get("/v1/jobs/{job_id}", response_model=JobPublic, tags=["jobs"], responses=_errors(401, 404, 422))
    def get_job(job_id: JobId, who: Tenant) -> JobPublic:
        return JobPublic.of(own_job(job_id, who))

    @app.post(
        "/v1/jobs/{job_id}/cancel", response_model=JobPublic, tags=["jobs"], responses=_errors(401, 404, 409, 422)
    )
    def cancel(job_id: JobId, who: Tenant) -> JobPublic:
        """A queued job is cancelled at once; a running one stops at its next block (CANCELLING)."""
        job = own_job(job_id, who)
        if job.state == JobState.QUEUED and store.transition(job.id, [JobState.QUEUED], JobState.CANCELLED):
            return JobPublic.of(own_job(job_id, who))
        if job.state in (JobState.RUNNING, JobState.UPLOADING) and store.transition(
            job.id, [job.state], JobState.CANCELLING
        ):
            return JobPublic.of(own_job(job_id, who))
        job = own_job(job_id, who)
        if job.state in (JobState.CANCELLING, JobState.CANCELLED):
            return JobPublic.of(job)
        raise Problem(409, "Job already finished", f"job {job.id} is {job.state.value}; it cannot be cancelled")

    @app.get(
        "/v1/jobs/{job_id}/events",
        tags=["jobs"],
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"},
            **_errors(401, 404, 422),
        },
    )
    async def events(job_id: JobId, who: Tenant, request: Request) -> StreamingResponse:
        """Server-sent events: a `job` event with the job each time its state or progress changes; the stream
        ends after the job reaches a final state."""
        await run_in_threadpool(own_job, job_id, who)

        async def stream() -> AsyncIterator[str]:
            last, quiet = "", 0.0
            while True:
                job = await run_in_threadpool(store.get, job_id, who)
                if job is None:
                    return
                body = JobPublic.of(job).model_dump_json()
                if body != last:
                    last, quiet = body, 0.0
                    yield f"id: {job.updated_at:.6f}\nevent: job\ndata: {body}\n\n"
                if job.state.terminal:
                    yield f"event: end\ndata: {json.dumps({'state': job.state.value})}\n\n"
                    return
                if quiet >= 15:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                if await request.is_disconnected():
                    return
                await asyncio.sleep(min(settings.poll_seconds, 1.0))
                quiet += min(settings.poll_seconds, 1.0)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    def manifest_of(job: Job) -> dict[str, Any]:
        if job.state != JobState.SUCCEEDED or not job.artifact:
            raise Problem(
                409, "Artifact not ready", f"job {job.id} is {job.state.value}; its artifact exists once it SUCCEEDED"
            )
        try:
            return json.loads(storage.get_bytes(join_key(job.artifact, MANIFEST)))
        except (ObjectNotFound, StorageError, ValueError) as exc:
            log.error("job %s: artifact manifest unreadable: %s", job.id, exc)
            raise Problem(500, "Artifact unavailable", f"the artifact of job {job.id} cannot be read: {exc}") from None

    @app.get(
        "/v1/jobs/{job_id}/artifact",
        response_model=ArtifactPublic,
        tags=["artifacts"],
        responses=_errors(401, 404, 409, 422),
    )
    def artifact(job_id: JobId, who: Tenant) -> ArtifactPublic:
        """Every file of the artifact with its size, sha256 and download URL (manifest.json last)."""
        job = own_job(job_id, who)
        manifest = manifest_of(job)
        base = f"/v1/jobs/{job.id}/artifact"
        files = [
            ArtifactFile(name=name, size=int(e["size"]), sha256=str(e["sha256"]), url=f"{base}/{name}")
            for name, e in sorted(manifest.get("files", {}).items())
        ]
        return ArtifactPublic(
            job=job.id, format_version=manifest.get("format_version"), files=files, manifest_url=f"{base}/{MANIFEST}"
        )

    @app.get(
        "/v1/jobs/{job_id}/artifact/{name:path}",
        tags=["artifacts"],
        response_class=Response,
        responses={
            200: {"content": {"application/octet-stream": {}}, "description": "The file (local storage)"},
            307: {"description": "Redirect to a presigned URL of the file (S3 storage)"},
            **_errors(401, 404, 409, 422),
        },
    )
    def artifact_file(job_id: JobId, name: str, who: Tenant) -> Response:
        """One file: a redirect to a presigned URL (S3) or the bytes (local storage)."""
        job = own_job(job_id, who)
        manifest = manifest_of(job)
        if name != MANIFEST and name not in manifest.get("files", {}):
            raise Problem(404, "Not found", f"the artifact of job {job.id} has no file {name!r}")
        assert job.artifact is not None
        key = join_key(job.artifact, check_key(name))
        if isinstance(storage, LocalStorage):
            return FileResponse(storage.locate(key), media_type="application/octet-stream", filename=name)
        url = storage.url(key, expires=settings.presign_seconds)
        if url is None:
            raise Problem(500, "No download URL", f"the storage backend gives no URL for {name}")
        return RedirectResponse(url, status_code=307)

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's spec, with every error response as what it is: application/problem+json, ProblemDetails."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = default_openapi()  # FastAPI keeps it as app.openapi_schema: this runs once
        problem_schema = ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(problem_schema.pop("$defs", {}))
        schemas["ProblemDetails"] = problem_schema
        for item in spec.get("paths", {}).values():
            for operation in item.values():
                for code, response in operation.get("responses", {}).items():
                    if code[:1] in ("4", "5"):
                        response["content"] = {PROBLEM: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}}
        for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, not ours
            schemas.pop(unused, None)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
    mount_dashboard(app)  # the web UI at /ui/ (and / redirects there); its data comes from /v1
    return app


_ERRORS = {
    400: "The body cannot be read (not UTF-8 JSON)",
    401: "No valid API key (header WWW-Authenticate: Bearer)",
    404: "No such job for this API key (another tenant's job looks the same)",
    409: "Conflict with the job's state, or an Idempotency-Key reused with another body",
    413: "Request body above PBS2P_MAX_BODY_BYTES",
    422: "Invalid request: `errors` names each field and what to change",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries of error responses (their content is set in `create_app`'s openapi())."""
    return {code: {"description": _ERRORS[code]} for code in codes}


def _fix_hint(error: Any) -> str:
    """pydantic's message, with what to do where it does not say."""
    if error["type"] == "extra_forbidden":
        return "unknown field; remove it or check its spelling (the fields are listed at /docs)"
    return str(error["msg"])


def _invalid_field(field: str, message: str) -> Problem:
    return Problem(422, "Invalid request", f"{field}: {message}", errors=[{"field": field, "message": message}])


def _field_named(message: str, given: dict[str, Any], default: str) -> str:
    """The config field a core validation message is about (messages start with or name the field)."""
    for name in sorted(CompressionConfig.__dataclass_fields__, key=len, reverse=True):
        if message.startswith(name) or f"{name}=" in message or (name in given and f" {name} " in f" {message} "):
            return f"config.{name}"
    if message.startswith("pattern"):
        return "config.pattern"
    return default
