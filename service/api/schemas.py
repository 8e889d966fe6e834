"""Request and response bodies of the HTTP API (pydantic). The job's config is `CompressionConfig` itself: its
schema, defaults and validation are the core's, and its field names are the CLI options'."""

from __future__ import annotations

import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pbs2p.core.config import CompressionConfig
from pbs2p.workers.evaluation import EvalSpec

from ..jobstore import Job, JobState

_STRICT = ConfigDict(extra="forbid")


class JobCreate(BaseModel):
    model_config = _STRICT
    model: str = Field(
        ...,
        min_length=1,
        max_length=1024,
        examples=["smollm2-135m"],
        description="an alias (smollm2-135m), a Hugging Face id (org/name or org/name@revision), s3://BUCKET/PREFIX "
        "of a model directory, or an absolute path under the service's PBS2P_MODEL_ROOTS",
    )
    revision: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        examples=["main"],
        description="for a Hugging Face id: the branch, tag or commit to fetch (default main); the same as "
        "org/name@revision",
    )
    config: CompressionConfig = Field(
        default_factory=CompressionConfig, description="the compression config; every field has a default"
    )
    evaluate: EvalSpec | None = None
    name: str | None = Field(None, min_length=1, max_length=200, description="a name for the job, shown in lists")
    webhook_url: str | None = Field(
        None,
        min_length=1,
        max_length=2000,
        description="POSTed a signed event at each state change of the job (X-Pbs2p-Signature: sha256=HMAC of the "
        "body under the service's webhook secret)",
    )
    priority: int = Field(
        0,
        ge=-100,
        le=100,
        strict=True,
        description="within the tenant, higher priority starts first (tenants take turns)",
    )


class Progress(BaseModel):
    stage: str | None = Field(
        None, description="prepare, downloading, capture, coarse, compress, evaluate, upload or done"
    )
    block: int | None = None
    blocks: int | None = None
    bytes_done: int | None = Field(None, description="while downloading: bytes fetched so far")
    bytes_total: int | None = Field(None, description="while downloading: bytes to fetch in all")
    percent: float | None = None
    eta_seconds: float | None = None


class JobSummary(BaseModel):
    """A job as lists have it: GET /v1/jobs/{id}'s fields without the per-block `report` and the `timings`."""

    id: str
    name: str | None
    state: JobState
    model: str
    config: dict[str, Any]
    evaluate: dict[str, Any] | None
    created_at: datetime.datetime
    updated_at: datetime.datetime
    started_at: datetime.datetime | None
    finished_at: datetime.datetime | None
    attempts: int
    priority: int
    progress: Progress
    metrics: dict[str, Any]
    error: str | None
    artifact_expired_at: datetime.datetime | None = Field(
        None, description="when retention removed the artifact (410 from then on); the metrics stay"
    )
    links: dict[str, str]

    @classmethod
    def of(cls, job: Job) -> JobSummary:
        fields = _fields(job)
        del fields["timings"], fields["report"]
        return cls.model_construct(**fields)


class JobPublic(JobSummary):
    """A job: its state, progress, metrics, timings and per-block report."""

    timings: dict[str, Any]
    report: dict[str, Any]

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        return cls.model_construct(**_fields(job))


def _ts(t: float | None) -> datetime.datetime | None:
    return None if t is None else datetime.datetime.fromtimestamp(t, datetime.UTC)


def _fields(job: Job) -> dict[str, Any]:
    """The response fields of `job`, each already of its declared type: the models are built without validating
    again what the store holds (built and validated, a job took ~3x the CPU; GET is the API's busiest route)."""
    report = dict(job.report)
    base = f"/v1/jobs/{job.id}"
    return dict(
        id=job.id,
        name=job.name,
        state=job.state,
        model=job.model,
        config=job.config,
        evaluate=job.evaluate,
        created_at=_ts(job.created_at),
        updated_at=_ts(job.updated_at),
        started_at=_ts(job.started_at),
        finished_at=_ts(job.finished_at),
        attempts=job.attempts,
        priority=job.priority,
        progress=Progress(**{k: v for k, v in job.progress.items() if k in Progress.model_fields}),
        metrics=report.pop("metrics", {}),
        timings=report.pop("timings", {}),
        report=report,
        error=job.error,
        artifact_expired_at=_ts(job.artifact_expired_at),
        links={"self": base, "events": f"{base}/events", "artifact": f"{base}/artifact"},
    )


class JobList(BaseModel):
    jobs: list[JobSummary] = Field(description="job summaries (GET /v1/jobs/{id} adds the report and the timings)")
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next (older) page")


class ArtifactFile(BaseModel):
    name: str
    size: int
    sha256: str
    url: str


class ArtifactPublic(BaseModel):
    job: str
    format_version: int | None
    files: list[ArtifactFile]
    manifest_url: str


class Health(BaseModel):
    status: str = Field(description="ok: the service and its database answer")
    dispatcher: bool = Field(description="whether a dispatcher runs jobs in this process")


class ProblemField(BaseModel):
    field: str = Field(description="the request field, dotted (config.pattern, query.limit, ...)")
    message: str = Field(description="what is wrong and what to change")


class ProblemDetails(BaseModel):
    """An error, as RFC 9457 problem details (sent as application/problem+json)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str = ""
    request_id: str = Field("", description="the request's id (also the X-Request-ID header): quote it in reports")
    errors: list[ProblemField] | None = Field(None, description="422 only: each invalid field")
