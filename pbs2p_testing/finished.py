"""Finished jobs for the tests of what reads them (the report endpoint, the dashboard's comparison view): each one
compressed and evaluated for real with `run_job` on a tiny model, then stored as a SUCCEEDED job with the summary
the dispatcher stores, without a dispatcher (whatever service runs meanwhile never sees it queued)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pbs2p.core.config import CompressionConfig
from pbs2p.service.jobrecords import JobRow, JobState, dumps
from pbs2p.service.jobstore import JobStore
from pbs2p.workers.evaluation import EvalSpec
from pbs2p.workers.job import JobSpec, run_job
from pbs2p.workers.settings import WorkerSettings


@dataclass(frozen=True)
class Finished:
    id: str
    name: str
    summary: dict[str, Any]  # JobResult.summary(): what GET /v1/jobs/{id}/report serves


def tiny_options(calib: Path) -> dict[str, Any]:
    """Options that make a 2-block tiny model's job take about a second."""
    return {"calib": str(calib), "calib_samples": 4, "seqlen": 32, "block_size": 32, "salient_columns": 2}


def add_finished_job(
    store: JobStore,
    tenant: str,
    name: str,
    model: Path,
    calib: Path,
    out: Path,
    evaluate: bool = True,
    **options: Any,
) -> Finished:
    """Run the job of `options` (flat option names over `tiny_options`) on `model` into `out`, evaluated on
    `calib` (perplexity before/after) unless `evaluate` is False, and store it for `tenant` as SUCCEEDED with its
    summary."""
    cfg = CompressionConfig.from_options({**tiny_options(calib), **options})
    spec = EvalSpec(data=str(calib), windows=2, seqlen=32) if evaluate else None
    result = run_job(JobSpec(str(model), cfg, spec), out, WorkerSettings())
    summary = result.summary()
    job_id = "job_" + secrets.token_hex(12)
    now = time.time()
    with store.session() as s:
        s.add(JobRow(id=job_id, tenant=tenant, name=name, state=JobState.SUCCEEDED.value, model=str(model),
                     config=dumps(cfg.to_dict()), evaluate=dumps(spec.model_dump()) if spec else None,
                     created_at=now, updated_at=now, started_at=now, finished_at=now, attempts=1, priority=0,
                     report=dumps(summary), progress=dumps({"stage": "done", "percent": 100.0})))  # fmt: skip
    return Finished(job_id, name, summary)
