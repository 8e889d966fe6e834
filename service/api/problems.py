"""Errors as RFC 9457 problem details (application/problem+json): the exception routes raise, the handlers that
render it and FastAPI's own errors, and the OpenAPI entries of the error responses."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from pbs2p.core.config import error_message

from .schemas import ProblemDetails

PROBLEM = "application/problem+json"

ERRORS = {
    400: "The body cannot be read (not UTF-8 JSON)",
    401: "No valid API key (header WWW-Authenticate: Bearer)",
    404: "No such job for this API key (another tenant's job looks the same)",
    409: "Conflict with the job's state, or an Idempotency-Key reused with another body",
    410: "Gone: the job's artifact expired (PBS2P_ARTIFACT_RETENTION_DAYS); the job keeps its metrics",
    413: "Request body above PBS2P_MAX_BODY_BYTES",
    422: "Invalid request: `errors` names each field and what to change",
    429: "Too many jobs of this tenant queued (PBS2P_TENANT_MAX_QUEUED_JOBS); retry after Retry-After seconds",
    500: "Internal error: the service log has the details under the problem's request_id",
}


class Problem(Exception):
    """An RFC 9457 problem: raised by routes, rendered by the handler below (`headers`: extra response headers,
    e.g. Retry-After)."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra
        self.headers = headers


def invalid_field(field: str, message: str) -> Problem:
    """A 422 about one request field (a dotted path such as `model` or `config.pattern`)."""
    return Problem(422, "Invalid request", f"{field}: {message}", errors=[{"field": field, "message": message}])


def request_id_of(scope: Scope) -> str:
    """The id the RequestContext middleware gave this request ("" outside it)."""
    return str(scope.get("state", {}).get("request_id", ""))


def problem_response(
    status: int,
    title: str,
    detail: str,
    instance: str = "",
    request_id: str = "",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "instance": instance,
            "request_id": request_id, **extra}  # fmt: skip
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries of error responses (their content is set by `problem_openapi`)."""
    return {code: {"description": ERRORS[code]} for code in codes}


def add_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status, exc.title, exc.detail, request.url.path, request_id_of(request.scope), exc.headers, **exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the field path is the validator's own location: body.config.ablations.spbo_mode -> config.ablations...
        errors = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": error_message(e)}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors)
        return problem_response(
            422, "Invalid request", detail, request.url.path, request_id_of(request.scope), errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else None
        return problem_response(
            exc.status_code, str(exc.detail), str(exc.detail), request.url.path, request_id_of(request.scope), headers
        )


def problem_openapi(app: FastAPI) -> None:
    """FastAPI's spec, with every error response as what it is: application/problem+json, ProblemDetails."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = default_openapi()  # FastAPI keeps it as app.openapi_schema: this runs once
        problem_schema = ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(problem_schema.pop("$defs", {}))
        schemas["ProblemDetails"] = problem_schema
        for item in spec.get("paths", {}).values():
            for operation in item.values():
                operation.setdefault("responses", {}).setdefault("500", {"description": ERRORS[500]})
                for code, response in operation.get("responses", {}).items():
                    if code[:1] in ("4", "5"):
                        response["content"] = {PROBLEM: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}}
                    if code == "429":
                        response["headers"] = {"Retry-After": {"description": "seconds to wait before submitting "
                                               "again", "schema": {"type": "integer"}}}  # fmt: skip
        for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, not ours
            schemas.pop(unused, None)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
