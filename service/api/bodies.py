"""The JSON bodies of the busiest routes, GET /v1/jobs/{id} and GET /v1/jobs, rendered once per version of a job.

A body is a pure function of the job's row, so it is memoized by the row itself (every column, as read): a row
that changed in any way is a new key, and the bytes sent are those the models would render now. Polling clients
read the same rows again and again (a job changes once a block at most); rendering one (JSON of the stored
columns parsed, the models built, their JSON written) cost ~0.8 ms of CPU for a job with a 30-block report and
~0.7 ms for a page of 20 summaries (bench/api_cpu.py), now spent once per version. Lookups run on the event
loop's thread only (no lock). Both routes send an ETag (of the body's bytes) and answer a GET whose If-None-Match
holds it with a 304 and no body."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from starlette.responses import Response

from ..jobreads import job_of
from .schemas import JobPublic, JobSummary

Row = tuple[Any, ...]
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified: If-None-Match holds the ETag the body would have (no body)"}
}
MAX_BYTES = 64 * 2**20  # about what the memo may hold (rows and bodies); past it, it starts again empty


class JobBodies:
    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._full: dict[Row, tuple[bytes, str]] = {}  # row -> (body, its ETag)
        self._summary: dict[Row, bytes] = {}
        self._bytes = 0

    def job(self, row: Row) -> tuple[bytes, str]:
        """GET /v1/jobs/{id}'s body for the job of `row` (JobPublic's JSON) and its ETag."""
        found = self._full.get(row)
        if found is None:
            body = JobPublic.of(job_of(row)).model_dump_json().encode()
            found = (body, etag_of(body))
            self._keep(self._full, row, found, len(body))
        return found

    def summary(self, row: Row) -> bytes:
        """The job of `row` as a list has it (JobSummary's JSON)."""
        body = self._summary.get(row)
        if body is None:
            body = JobSummary.of(job_of(row)).model_dump_json().encode()
            self._keep(self._summary, row, body, len(body))
        return body

    def page(self, rows: list[Row], next_cursor: str | None) -> bytes:
        """GET /v1/jobs's body: JobList's JSON (its two fields in order, compact, as pydantic writes it)."""
        jobs = b",".join(self.summary(r) for r in rows)
        return b'{"jobs":[' + jobs + b'],"next_cursor":' + json.dumps(next_cursor).encode() + b"}"

    def _keep(self, memo: dict[Row, Any], row: Row, value: Any, body_bytes: int) -> None:
        size = body_bytes + sum(len(v) for v in row if isinstance(v, str))
        if self._bytes + size > self.max_bytes:
            self._full.clear()
            self._summary.clear()
            self._bytes = 0
        memo[row] = value
        self._bytes += size


def etag_of(body: bytes) -> str:
    """A strong ETag of the body's bytes."""
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def conditional(body: bytes, etag: str, if_none_match: str | None) -> Response:
    """The JSON `body` with its ETag, or a 304 when `if_none_match` names that ETag (or is `*`), compared weakly
    as RFC 9110 says for If-None-Match."""
    if if_none_match is not None:
        tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
        if etag in tags or "*" in tags:
            return Response(status_code=304, headers={"ETag": etag})
    return Response(body, media_type="application/json", headers={"ETag": etag})
