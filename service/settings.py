"""Service settings: every part switchable by a `PBS2P_*` environment variable (pydantic-settings).

Embedded defaults need no set-up: a SQLite file, local storage and checkpoints under the data directory, and
a local Ray started by the service. Production points `PBS2P_DATABASE_URL` at PostgreSQL, `PBS2P_STORAGE_URL`
at `s3://bucket/prefix` and `PBS2P_RAY_ADDRESS` at a cluster.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

from pbs2p.workers.settings import WorkerSettings
from pbs2p.workers.storage import S3Settings

# S3Settings' PBS2P_S3_* (its keys are the usual AWS_*), nested as `Settings.s3`: listed here so that
# `settings_doc` covers every PBS2P_* variable the service image reads
S3_ENV = {
    f"PBS2P_S3_{name.upper()}": field.description or ""
    for name, field in S3Settings.model_fields.items()
    if field.validation_alias is None  # the keys: AWS_ACCESS_KEY_ID, ...
}


class Settings(WorkerSettings):
    """The service's settings: the job layer's (`WorkerSettings`: cache, model size limit, S3) and its own."""

    model_config = SettingsConfigDict(env_prefix="PBS2P_", extra="ignore", env_ignore_empty=True, validate_by_name=True)

    data_dir: Path = Field(Path("pbs2p-data"), description="SQLite file, local artifacts and checkpoints")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite:///DATA_DIR/jobs.db")
    storage_url: str = Field("", description="artifacts: a directory or s3://bucket/prefix; default DATA_DIR/artifacts")
    checkpoint_url: str = Field("", description="per-block checkpoints of running jobs; default DATA_DIR/checkpoints")
    ray_address: str = Field("local", description="'local' starts a Ray on 127.0.0.1; else auto, HOST:PORT, ray://")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all)")
    dispatcher: bool = Field(
        True, description="`pbs2p serve` runs queued jobs (a worker process it supervises); false: API only"
    )
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="`pbs2p worker` serves its job metrics (Prometheus) on this port (0: none)"
    )
    max_running_jobs: int = Field(1, ge=1, description="jobs this dispatcher runs at once")
    tenant_max_queued_jobs: int = Field(
        0, ge=0, description="queued jobs a tenant may have; a submit above it gets 429 with Retry-After (0: no limit)"
    )
    tenant_max_running_jobs: int = Field(
        0, ge=0, description="jobs of one tenant running at once, over all dispatchers (0: no limit)"
    )
    job_workers: int | None = Field(None, ge=1, description="Ray workers per job (default: GPUs, else CPUs)")
    gpus_per_worker: float | None = Field(None, ge=0, description="default 1 when the cluster has GPUs")
    job_max_attempts: int = Field(
        3, ge=1, description="attempts of a job whose failures are transient (storage timeout, lost Ray node)"
    )
    artifact_retention_days: float = Field(
        0, ge=0, description="finished artifacts are removed this many days after the job ends (0: kept)"
    )
    webhook_secret: str = Field("", description="HMAC-SHA256 key signing webhook bodies; unset: no webhooks")
    webhook_hosts: str = Field("", description="comma-separated hosts webhook URLs may name (unset: any host)")
    webhook_attempts: int = Field(6, ge=1, description="deliveries of one webhook event (backoff 1, 2, 4, ... s)")
    lease_seconds: float = Field(60.0, gt=0, description="a running job without a heartbeat this long is re-queued")
    poll_seconds: float = Field(1.0, gt=0, description="dispatcher and event-stream poll interval")
    model_roots: str = Field("", description="comma-separated directories local model paths must lie under")
    max_body_bytes: int = Field(65536, ge=1024, description="largest accepted request body")
    presign_seconds: int = Field(3600, ge=60, description="lifetime of presigned artifact URLs")
    host: str = Field("127.0.0.1", description="address `pbs2p serve` binds")
    port: int = Field(8000, ge=0, le=65535, description="port `pbs2p serve` binds (0: any free port)")
    log_level: str = Field("info", description="debug, info, warning, error")
    access_log: bool = Field(True, description="one JSON line per request on the `pbs2p.access` logger (stderr)")

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("use debug, info, warning or error")
        return v.lower()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    @property
    def artifacts_url(self) -> str:
        return self.storage_url or str((self.data_dir / "artifacts").resolve())

    @property
    def checkpoints_url(self) -> str:
        return self.checkpoint_url or str((self.data_dir / "checkpoints").resolve())

    @property
    def roots(self) -> list[Path]:
        return [Path(p.strip()).expanduser().resolve() for p in self.model_roots.split(",") if p.strip()]


def settings_doc() -> dict[str, str]:
    """Every PBS2P_* variable the service reads, with its meaning (checked against deploy/ by the tests)."""
    doc = {}
    for name, f in Settings.model_fields.items():
        if name == "s3":
            continue
        alias = f.validation_alias
        names = [str(c) for c in alias.choices] if isinstance(alias, AliasChoices) else [f"PBS2P_{name.upper()}"]
        doc.update({n: f.description or "" for n in names if n.startswith("PBS2P_")})  # HF_* are huggingface_hub's
    return {**doc, **S3_ENV}
