"""Prometheus metrics of the jobs a dispatcher runs: how long each stage took, and failures by cause.

They live with the dispatcher (the process that runs the jobs); the API's /metrics serves them when the dispatcher
runs in its process (the embedded default). Queue depth per tenant is read from the store at scrape time instead
(service/api/metrics.py), so that every API replica reports it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# The stages of a job (workers/job.py's timings, without their `_s`) and the whole job
STAGES = ("prepare", "compress", "evaluate", "upload", "total")
# Why a job failed: `invalid` (the job's input: a Pbs2pError), `transient` (storage timeout, lost Ray node: retried
# until PBS2P_JOB_MAX_ATTEMPTS), `internal` (anything else: a bug; the log has the traceback)
CAUSES = ("invalid", "transient", "internal")


class JobMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "pbs2p_job_stage_seconds",
            "Duration of each stage of the jobs that succeeded (prepare, compress, evaluate, upload, total)",
            ["stage"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200),
            registry=self.registry,
        )
        self.failures = Counter(
            "pbs2p_job_failures",
            "Job attempts that failed, by cause (invalid, transient, internal); `retried` says if it runs again",
            ["cause", "retried"],
            registry=self.registry,
        )
        self.finished = Counter("pbs2p_jobs_finished", "Jobs finished by this dispatcher, by final state", ["state"],
                                registry=self.registry)  # fmt: skip

    def record_timings(self, timings: dict[str, float], total_seconds: float) -> None:
        for stage in STAGES[:-1]:
            if f"{stage}_s" in timings:
                self.stage_seconds.labels(stage).observe(float(timings[f"{stage}_s"]))
        self.stage_seconds.labels("total").observe(total_seconds)
