"""Settings of the layer that runs jobs, read once from `PBS2P_*` environment variables (pydantic-settings) by
an entry point (the CLI, the service) and passed down: nothing below reads the environment itself.

The service's own settings (`service/settings.py`) extend these.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .storage import S3Settings


def _default_cache() -> Path:
    return Path.home() / ".cache" / "pbs2p"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PBS2P_", extra="ignore", env_ignore_empty=True)

    cache_dir: Path = Field(
        default_factory=_default_cache,
        description="prepared models (aliases, s3:// and Hugging Face downloads) and default checkpoints; "
        "default ~/.cache/pbs2p",
    )
    max_model_bytes: int = Field(200 * 2**30, ge=1, description="largest model downloaded from s3://")
    # how to reach S3 (PBS2P_S3_*, the AWS_* keys), for s3:// models, artifacts and checkpoints
    s3: S3Settings = Field(default_factory=S3Settings, exclude=True)

    @property
    def models_dir(self) -> Path:
        return self.cache_dir.expanduser() / "models"

    @property
    def default_checkpoint_url(self) -> str:
        return str(self.cache_dir.expanduser() / "checkpoints")
