"""`S3Settings`: how to reach an S3 API and move data. Apart from `s3` (boto3) so that the settings load without
the `s3` extra installed: they are read wherever the workers' settings are."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ByteSize, Field, ValidationError, ValidationInfo, ValidatorFunctionWrapHandler, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .base import MiB, StorageError

S3_MIN_PART_SIZE = 5 * MiB  # S3 refuses smaller parts (except the last one)


class S3Settings(BaseSettings):
    """How to reach an S3 API and move data. `S3Settings()` reads PBS2P_S3_* and the AWS_* keys: entry points do
    that once and pass the object down (to another process as `to_dict()`)."""

    model_config = SettingsConfigDict(
        env_prefix="PBS2P_S3_", env_ignore_empty=True, extra="forbid", validate_by_name=True
    )

    endpoint_url: str | None = Field(None, description="S3 endpoint for s3:// URLs (MinIO, R2, ...); unset for AWS")
    region: str | None = Field(None, description="S3 region (default us-east-1)")
    path_style: bool = Field(False, description="1 for path-style S3 addressing (MinIO)")
    checksums: bool = Field(
        True, description="0 turns off sha256 checksums sent with S3 uploads (for stores that reject them)"
    )
    multipart_threshold: ByteSize = Field(
        ByteSize(64 * MiB),
        ge=1,
        description="S3 uploads and downloads of this size or more go in parts (bytes, or e.g. 64MiB)",
    )
    part_size: ByteSize = Field(
        ByteSize(64 * MiB),
        ge=S3_MIN_PART_SIZE,
        description="size of the parts of an S3 multipart transfer (at least 5MiB)",
    )
    max_concurrency: int = Field(
        4, ge=1, description="parts of one S3 transfer in flight at once (an upload holds that many in memory)"
    )
    max_attempts: int = Field(5, ge=0, description="retries of a failed S3 request (botocore's max_attempts)")
    # None: boto3's own credential chain (environment, profile, instance role)
    access_key: str | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID", repr=False)
    secret_key: str | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY", repr=False)
    session_token: str | None = Field(None, validation_alias="AWS_SESSION_TOKEN", repr=False)

    @field_validator("path_style", "checksums", mode="wrap")
    @classmethod
    def _flag(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        try:
            return handler(value)
        except ValidationError:
            name = f"PBS2P_S3_{(info.field_name or '').upper()}"
            raise ValueError(f"{name}={value!r} is not a boolean; use 1 or 0 (true/false)") from None

    @classmethod
    def defaults(cls) -> S3Settings:
        """The defaults alone, without reading the environment."""
        return cls.model_construct()

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the keys included) for another process, where `from_dict` takes them back."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> S3Settings:
        """The settings of `to_dict()`, as given: validated where they were read, and no environment read here."""
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise StorageError(f"unknown S3 settings {unknown}; known: {', '.join(cls.model_fields)}")
        return cls.model_construct(**values)
