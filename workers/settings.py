"""Settings of the layer that runs jobs, read once from `PBS2P_*` environment variables (pydantic-settings) by
an entry point (the CLI, the service) and passed down: nothing below reads the environment itself.

The service's own settings (`service/settings.py`) extend these.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .storage import S3Settings


def _default_cache() -> Path:
    return Path.home() / ".cache" / "pbs2p"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PBS2P_", extra="ignore", env_ignore_empty=True, validate_by_name=True)

    cache_dir: Path = Field(
        default_factory=_default_cache,
        description="prepared models (aliases, s3:// and Hugging Face downloads) and default checkpoints; "
        "default ~/.cache/pbs2p",
    )
    max_model_bytes: int = Field(
        200 * 2**30, ge=1, description="largest model downloaded from s3:// or a Hugging Face hub (bytes)"
    )
    tasks_dir: Path | None = Field(
        None,
        description="zero-shot tasks (evaluate.tasks): a folder of lm-eval task YAMLs with local data, and/or "
        "copies of the built-in tasks' data saved with datasets' save_to_disk as <data>/<split>/",
    )
    # the Hugging Face hub, under the names huggingface_hub and `hf download` read (HF_HUB_OFFLINE also as a
    # PBS2P_ setting); the token is a deployment secret: never stored, logged or returned
    hf_offline: bool = Field(
        False,
        validation_alias=AliasChoices("PBS2P_HF_OFFLINE", "HF_HUB_OFFLINE"),
        description="1: never contact a hub; Hugging Face ids resolve only to models already in the cache "
        "(also HF_HUB_OFFLINE=1)",
    )
    hf_endpoint: str = Field(
        "https://huggingface.co",
        validation_alias=AliasChoices("HF_ENDPOINT"),
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="the hub (or a mirror) Hugging Face ids are fetched from",
    )
    hf_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("HF_TOKEN"), exclude=True, repr=False, description="hub access token"
    )
    # how to reach S3 (PBS2P_S3_*, the AWS_* keys), for s3:// models, artifacts and checkpoints
    s3: S3Settings = Field(default_factory=S3Settings, exclude=True)

    @property
    def hub_dir(self) -> Path:
        """Models fetched from a hub: `<org>--<name>/<commit>/`, one directory per commit."""
        return self.models_dir / "hub"

    @property
    def models_dir(self) -> Path:
        return self.cache_dir.expanduser() / "models"

    @property
    def default_checkpoint_url(self) -> str:
        return str(self.cache_dir.expanduser() / "checkpoints")
