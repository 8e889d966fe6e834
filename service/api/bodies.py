"""The JSON bodies of the busiest routes, GET /v1/jobs/{id} and GET /v1/jobs, rendered once per version of a job.

A body is a pure function of the job's row, so it is memoized by the row itself (every column, as read): a row
that changed in any way is a new key, and the bytes sent are those the models would render now. Polling clients
read the same rows again and again (a job changes once a block at most); rendering one (JSON of the stored
columns parsed, the models built, their JSON written) was ~60 % of such a request's CPU, ~2 ms for a job with a
30-block report. Lookups run on the event loop's thread only (no lock)."""

from __future__ import annotations

import json
from typing import Any

from ..jobreads import job_of
from .schemas import JobPublic, JobSummary

Row = tuple[Any, ...]
MAX_BYTES = 64 * 2**20  # about what the memo may hold (rows and bodies); past it, it starts again empty


class JobBodies:
    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._full: dict[Row, bytes] = {}
        self._summary: dict[Row, bytes] = {}
        self._bytes = 0

    def job(self, row: Row) -> bytes:
        """GET /v1/jobs/{id}'s body for the job of `row` (JobPublic's JSON)."""
        body = self._full.get(row)
        if body is None:
            body = JobPublic.of(job_of(row)).model_dump_json().encode()
            self._keep(self._full, row, body)
        return body

    def summary(self, row: Row) -> bytes:
        """The job of `row` as a list has it (JobSummary's JSON)."""
        body = self._summary.get(row)
        if body is None:
            body = JobSummary.of(job_of(row)).model_dump_json().encode()
            self._keep(self._summary, row, body)
        return body

    def page(self, rows: list[Row], next_cursor: str | None) -> bytes:
        """GET /v1/jobs's body: JobList's JSON (its two fields in order, compact, as pydantic writes it)."""
        jobs = b",".join(self.summary(r) for r in rows)
        return b'{"jobs":[' + jobs + b'],"next_cursor":' + json.dumps(next_cursor).encode() + b"}"

    def _keep(self, memo: dict[Row, bytes], row: Row, body: bytes) -> None:
        size = len(body) + sum(len(v) for v in row if isinstance(v, str))
        if self._bytes + size > self.max_bytes:
            self._full.clear()
            self._summary.clear()
            self._bytes = 0
        memo[row] = body
        self._bytes += size
