"""The two polling reads, GET /v1/jobs/{id} and GET /v1/jobs (first page, no filter), answered without FastAPI's
routing and dependency solving when the request is the plain case; everything else goes on to the app.

Under 200 polling clients FastAPI's per-request machinery (routing, dependency solving with the bearer scheme's
cache keys, parameter extraction, its exit stack and exception layers) was most of a GET's CPU; the read itself
(a key already checked, one SQL read, a body rendered once per row by AppState.bodies) is a small part. This
layer sits inside RequestContext and BodyLimit (the request id, the 500 problem, metrics and the access log are
theirs, as for any request) and answers only when the answer is the route's own: the path is the route's (an id
the route accepts), a list has no query but `limit` (1-200), the API key was checked within KEY_CACHE_S
(deps.cached_tenant) and the job exists. A missing job, an unknown key, an odd query: the app answers, as before,
with its 401, 404 or 422. The bytes and headers sent are those of the routes (service/api/routes/jobs.py)."""

from __future__ import annotations

import re
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..jobrecords import encode_cursor
from .bodies import conditional, etag_of
from .deps import AppState, cached_tenant

JOB_PATH = re.compile(r"/v1/jobs/([A-Za-z0-9_-]{1,40})")  # the route's path and JobId
LIST_QUERY = re.compile(rb"(?:limit=([1-9][0-9]{0,2}))?")
JOB_ROUTE, LIST_ROUTE = "/v1/jobs/{job_id}", "/v1/jobs"
LIST_LIMIT, LIST_MAX = 50, 200  # the list route's default and bound of `limit`


class HotReads:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # route path -> the app's route, as its router put it in the scope of a request it answered (what
        # RequestContext labels metrics and the access log with); a route is answered here once the app has
        self._routes: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = scope["type"] == "http" and scope["method"] == "GET" and scope["path"].startswith("/v1/jobs")
        if hot:
            response = await self._answer(scope)
            if response is not None:
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
        route = scope.get("route") if hot else None
        if getattr(route, "path", None) in (JOB_ROUTE, LIST_ROUTE) and "GET" in getattr(route, "methods", ()):
            self._routes.setdefault(route.path, route)  # type: ignore[union-attr]

    async def _answer(self, scope: Scope) -> Response | None:
        path, job_id, limit = scope["path"], None, LIST_LIMIT
        if path == LIST_ROUTE:
            query = LIST_QUERY.fullmatch(scope["query_string"])
            if query is None or (query[1] and int(query[1]) > LIST_MAX):
                return None
            limit = int(query[1]) if query[1] else LIST_LIMIT
        elif (match := JOB_PATH.fullmatch(path)) is not None:
            job_id = match[1]
        else:
            return None
        route = self._routes.get(LIST_ROUTE if job_id is None else JOB_ROUTE)
        if route is None:
            return None
        authorization = if_none_match = None
        for name, value in scope["headers"]:  # the first of each, as Starlette's Headers.get
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"if-none-match" and if_none_match is None:
                if_none_match = value.decode("latin-1")
        scheme, _, key = (authorization or "").partition(" ")  # as FastAPI's HTTPBearer reads it
        state: AppState = scope["app"].state.pbs2p
        who = cached_tenant(state, key.strip()) if scheme.lower() == "bearer" else None
        if who is None:
            return None
        if job_id is not None:
            row = await run_in_threadpool(state.store.get_row, job_id, who)
            if row is None:
                return None
            body, etag = state.bodies.job(row)
        else:
            rows, last = await run_in_threadpool(state.store.list_rows, who, (), limit, None)
            body = state.bodies.page(rows, encode_cursor(last) if last else None)
            etag = etag_of(body)
        scope.setdefault("state", {})["tenant"] = who  # for the access log, as deps.tenant notes it
        scope["route"] = route
        return conditional(body, etag, if_none_match)
