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
        None,
        description="while the job runs: prepare, downloading (bytes of a hub download), capture, coarse (the CFS "
        "plan), compress (block i of L), evaluate, upload; done once it SUCCEEDED; retrying (QUEUED again after a "
        "transient failure) or requeued (QUEUED again: its dispatcher was lost or shut down)",
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


class LinearResult(BaseModel):
    name: str = Field(description="the linear's full name in the model (model.layers.0.self_attn.q_proj)")
    shape: list[int] = Field(description="[out_features, in_features]")
    rel_error: float = Field(description="relative reconstruction error on the calibration inputs, ‖WX − ŴX‖² / ‖WX‖²")
    rel_error_oneshot: float | None = Field(
        None, description="the same for one-shot prune-binarize (before SPBO); with ablations.spbo_report only"
    )
    bits: dict[str, float] = Field(description="bit counts of the packed linear and its paper_bits, true_bits")


class BlockResult(BaseModel):
    index: int
    n_keep: int = Field(description="N, the kept weights per group of M, chosen for this block")
    cosine: float | None = Field(None, description="the CFS coarse stage's cosine of the block (None without CFS)")
    seconds: float
    linears: list[LinearResult]


class ReportMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")
    ppl_before: float | None = Field(None, description="perplexity of the source model (jobs with `evaluate`)")
    ppl_after: float | None = Field(None, description="perplexity of the packed artifact on the same windows")
    paper_bits: float | None = Field(None, description="bits per weight as the paper counts them")
    true_bits: float | None = Field(None, description="bits per weight of the packed artifact, everything counted")
    mean_rel_error: float | None = Field(None, description="the mean of the linears' rel_error")


class JobReport(BaseModel):
    """A finished job's report: what the dashboard's comparison view puts side by side."""

    job: str
    name: str | None
    model: str
    method: str | None = Field(description="config.method")
    pattern: str | None = Field(description="config.pattern, the target N:M")
    allocation: str | None = Field(description="config.allocation: how N is chosen per block")
    config: dict[str, Any]
    metrics: ReportMetrics
    timings: dict[str, float]
    blocks: list[BlockResult]

    @classmethod
    def of(cls, job: Job) -> JobReport:
        report, cfg = job.report, job.config
        return cls(
            job=job.id,
            name=job.name,
            model=job.model,
            method=cfg.get("method"),
            pattern=cfg.get("pattern"),
            allocation=cfg.get("allocation"),
            config=cfg,
            metrics=ReportMetrics.model_validate(report.get("metrics") or {}),
            timings=report.get("timings") or {},
            blocks=[BlockResult.model_validate(b) for b in report.get("blocks") or []],
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
