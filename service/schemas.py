"""Request and response bodies of the HTTP API (pydantic). The config fields carry the CLI option names."""

from __future__ import annotations

import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pbs2p_core.config import (
    Allocation,
    ArbVariant,
    CfsScore,
    MaskScore,
    Method,
    Propagation,
    SalientAllocation,
    ScaleDtype,
    ScaleLayout,
    SpboMode,
)

from .store import Job, JobState

_STRICT = ConfigDict(extra="forbid")


class ConfigIn(BaseModel):
    """The compression config; every field optional (defaults of `pbs2p compress`), unknown fields refused."""

    model_config = _STRICT
    method: Method | None = None
    pattern: str | None = Field(None, pattern=r"^\d{1,2}:\d{1,2}$", examples=["6:8"])
    spbo_steps: int | None = Field(None, ge=1, le=16)
    spbo_mode: SpboMode | None = None
    allocation: Allocation | None = None
    cfs_score: CfsScore | None = None
    cfs_spread: int | None = Field(None, ge=0, le=16)
    cfs_samples: int | None = Field(None, ge=1, le=4096)
    mask_score: MaskScore | None = None
    block_size: int | None = Field(None, ge=8, le=8192)
    damping: float | None = Field(None, gt=0, lt=10)
    arb_iters: int | None = Field(None, ge=1, le=1000)
    arb_variant: ArbVariant | None = None
    salient_columns: int | None = Field(None, ge=0, le=4096)
    salient_search: list[int] | None = Field(None, max_length=16)
    salient_allocation: SalientAllocation | None = None
    column_feedback: bool | None = None
    scale_refit: bool | None = None
    spbo_report: bool | None = None
    scale_dtype: ScaleDtype | None = None
    scale_layout: ScaleLayout | None = None
    skip_modules: list[str] | None = Field(None, max_length=64)
    propagation: Propagation | None = None
    true_sequential: bool | None = None
    calib: str | None = Field(None, min_length=1, max_length=1024)
    calib_samples: int | None = Field(None, ge=1, le=4096)
    seqlen: int | None = Field(None, ge=8, le=32768)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    batch_size: int | None = Field(None, ge=1, le=1024)
    device: str | None = Field(None, pattern=r"^(cpu|cuda(:\d{1,2})?)$")
    version: int | None = Field(None, ge=1, le=1000)


class EvaluateIn(BaseModel):
    """Perplexity before and after compression, measured by the job once the artifact exists."""

    model_config = _STRICT
    data: str = Field("wiki", min_length=1, max_length=1024, description="'wiki' (held-out split) or a text file")
    seqlen: int = Field(512, ge=8, le=32768)
    windows: int = Field(40, ge=1, le=100000)


class JobCreate(BaseModel):
    model_config = _STRICT
    model: str = Field(..., min_length=1, max_length=1024, examples=["smollm2-135m"])
    config: ConfigIn = Field(default_factory=ConfigIn)
    evaluate: EvaluateIn | None = None
    name: str | None = Field(None, min_length=1, max_length=200)


class Progress(BaseModel):
    stage: str | None = None
    block: int | None = None
    blocks: int | None = None
    percent: float | None = None
    eta_seconds: float | None = None


class JobPublic(BaseModel):
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
    progress: Progress
    metrics: dict[str, Any]
    timings: dict[str, Any]
    report: dict[str, Any]
    error: str | None
    links: dict[str, str]

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        def ts(t: float | None) -> datetime.datetime | None:
            return None if t is None else datetime.datetime.fromtimestamp(t, datetime.UTC)

        report = dict(job.report)
        base = f"/v1/jobs/{job.id}"
        return cls(
            id=job.id,
            name=job.name,
            state=job.state,
            model=job.model,
            config=job.config,
            evaluate=job.evaluate,
            created_at=ts(job.created_at),  # type: ignore[arg-type]
            updated_at=ts(job.updated_at),  # type: ignore[arg-type]
            started_at=ts(job.started_at),
            finished_at=ts(job.finished_at),
            attempts=job.attempts,
            progress=Progress(**{k: v for k, v in job.progress.items() if k in Progress.model_fields}),
            metrics=report.pop("metrics", {}),
            timings=report.pop("timings", {}),
            report=report,
            error=job.error,
            links={"self": base, "events": f"{base}/events", "artifact": f"{base}/artifact"},
        )


class JobList(BaseModel):
    jobs: list[JobPublic]
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
    errors: list[ProblemField] | None = Field(None, description="422 only: each invalid field")
