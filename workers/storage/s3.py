"""`S3Storage`: any S3 API through boto3's managed transfers; `S3Settings`: how to reach it and move data.

Transfers above `multipart_threshold` go in parts of `part_size`, `max_concurrency` at a time (boto3's
`upload_fileobj` / `download_fileobj`). A multipart upload that fails is aborted by the transfer, so nothing
appears under the key. Each object carries the sha256 of its whole content as metadata (`x-amz-meta-sha256`);
it is fixed when the upload starts, so a file is hashed before it goes up, and hashed again as the transfer
reads it: bytes that no longer match (the file changed) fail the transfer before it completes. With
`checksums`, botocore sends the SHA256 of every request (every part) for the server to check. A download
lands in a temp file, which is hashed and checked against the expected or stored sha256, then renamed.

Nothing here reads the environment: entry points build `S3Settings()` (PBS2P_S3_*, AWS_* keys) and pass it
down; keys left unset fall to boto3's own credential chain (environment, profile, instance role).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError, S3UploadFailedError

from .base import (
    ChecksumMismatch,
    MiB,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageError,
    check_key,
    check_prefix,
    download_to,
    join_key,
    os_error_message,
    short,
    verified,
)
from .s3_settings import S3_MIN_PART_SIZE, S3Settings

log = logging.getLogger(__name__)

SHA256_METADATA = "sha256"  # sent as the header x-amz-meta-sha256

# refusals that mean "your checksum is wrong" (or "I don't do checksums")
_CHECKSUM_CODES = ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidRequest", "NotImplemented")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_S3_ERRORS = (ClientError, BotoCoreError, RetriesExceededError, S3DownloadFailedError, S3UploadFailedError)


class _HashingReader:
    """A file being uploaded in parts, hashed as the transfer reads it. boto3 reads a seekable file object in
    order, one part at a time (and sends copies of the parts); once `size` bytes are read they must hash to
    `sha256`, else the read raises, and the transfer aborts the upload instead of completing it."""

    def __init__(self, f: IO[bytes], size: int, sha256: str, source: str, dest: str) -> None:
        self._f, self._size, self._sha256, self._source, self._dest = f, size, sha256, source, dest
        self._h = hashlib.sha256()
        self._hashed = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def read(self, n: int = -1) -> bytes:
        at = self._f.tell()
        if at != self._hashed:  # never the case with boto3; if it were, the bytes could not be verified
            raise StorageError(f"the upload of {self._source} read it out of order (at byte {at}); it was aborted")
        try:
            chunk = self._f.read(n)
        except OSError as exc:
            msg = os_error_message(exc, "read", f"{self._source} (uploading to {self._dest})")
            raise StorageError(f"{msg}; the multipart upload was aborted") from exc
        self._h.update(chunk)
        self._hashed += len(chunk)
        if self._hashed >= self._size or n < 0 or len(chunk) < n:  # the end, or the file ended early
            got = self._h.hexdigest()
            if self._hashed != self._size or got != self._sha256:
                raise ChecksumMismatch(
                    f"{self._source} has sha256 {short(got)} while uploaded, expected {short(self._sha256)}: it "
                    f"changed or is corrupted; the upload to {self._dest} was aborted"
                )
        return chunk


class S3Storage(Storage):
    """Any S3 API (AWS, MinIO, R2, …) through boto3 with SigV4. Keys live under `s3://bucket/prefix/`."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        path_style: bool = False,
        *,
        session_token: str | None = None,
        multipart_threshold: int = 64 * MiB,
        part_size: int = 64 * MiB,
        max_concurrency: int = 4,
        checksums: bool = True,
        max_attempts: int = 5,
    ) -> None:
        if not _BUCKET.fullmatch(bucket or ""):
            raise StorageError(
                f"S3 bucket name {bucket!r} is not valid: 3 to 63 lowercase letters, digits, '.' or '-'; "
                f"fix the storage URL s3://BUCKET/PREFIX"
            )
        check_prefix(prefix)
        if (access_key is None) != (secret_key is None):
            raise StorageError(
                "give both an S3 access key and a secret key (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), "
                "or neither to use the default AWS credential chain"
            )
        if part_size < S3_MIN_PART_SIZE:
            raise StorageError(
                f"part_size {part_size} is below S3's minimum part size of 5 MiB; use at least {S3_MIN_PART_SIZE}"
            )
        if multipart_threshold < 1:
            raise StorageError(f"multipart_threshold {multipart_threshold} must be positive (bytes)")
        if max_concurrency < 1:
            raise StorageError(f"max_concurrency {max_concurrency} must be at least 1 (parts in flight at once)")
        if max_attempts < 0:
            raise StorageError(f"max_attempts {max_attempts} must be at least 0 (retries of a failed request)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.checksums = checksums
        session = boto3.session.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=session_token,
            region_name=region,
        )
        # SigV4 signs for a region; S3-compatible servers (MinIO, moto) accept this one
        self.region = session.region_name or "us-east-1"
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if path_style else "auto"},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            # checksums are asked for explicitly (SHA256, in _upload) or not at all: some S3-compatible servers
            # reject the CRC32 checksums that botocore would otherwise add to every upload
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client: Any = session.client("s3", endpoint_url=endpoint_url, region_name=self.region, config=config)
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=part_size,  # grown by boto3 where a file would need more than 10,000 parts
            max_concurrency=max_concurrency,
            num_download_attempts=1 + max_attempts,  # when a download's stream breaks
            preferred_transfer_client="classic",  # the CRT client would ignore these settings
        )
        # an upload from a file object holds the parts it has read in memory: at most one per thread
        self.transfer.max_in_memory_upload_chunks = max_concurrency

    @classmethod
    def from_settings(cls, bucket: str, prefix: str, s3: S3Settings) -> S3Storage:
        return cls(
            bucket,
            prefix,
            endpoint_url=s3.endpoint_url,
            region=s3.region,
            access_key=s3.access_key,
            secret_key=s3.secret_key,
            path_style=s3.path_style,
            session_token=s3.session_token,
            multipart_threshold=int(s3.multipart_threshold),
            part_size=int(s3.part_size),
            max_concurrency=s3.max_concurrency,
            checksums=s3.checksums,
            max_attempts=s3.max_attempts,
        )

    def __repr__(self) -> str:
        return f"S3Storage(s3://{self.bucket}/{self.prefix}, endpoint={self.endpoint_url or 'AWS'})"

    def _full(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def _full_prefix(self, prefix: str) -> str:
        check_prefix(prefix)
        return f"{self.prefix}/{prefix}" if self.prefix else prefix

    def locate(self, key: str) -> str:
        return f"s3://{self.bucket}/{join_key(self.prefix, key)}"

    # errors ------------------------------------------------------------------------------------------

    def _error(self, exc: Exception, action: str, key: str) -> StorageError:
        where = self.locate(key)
        endpoint = self.endpoint_url or "AWS S3"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code") or "?")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "NotFound") or (code == "404" and status == 404):
                return ObjectNotFound(f"no object {where}; check the key and the storage URL")
            if code == "NoSuchBucket":
                hint = (
                    f"bucket {self.bucket!r} does not exist at {endpoint}: check the bucket name in the storage URL "
                    f"and the endpoint (PBS2P_S3_ENDPOINT_URL)"
                )
            elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
                hint = (
                    "the server refused the credentials: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                    "the region (PBS2P_S3_REGION) and the endpoint (PBS2P_S3_ENDPOINT_URL)"
                )
            elif code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
                hint = (
                    f"access denied: check that these credentials may {action} objects in bucket {self.bucket!r} "
                    f"(IAM or bucket policy), the bucket name and the endpoint"
                )
            elif code in _CHECKSUM_CODES:
                hint = (
                    "the server rejected the request's checksum: the data changed in transit, or the server does "
                    "not support SHA256 checksums (then set PBS2P_S3_CHECKSUMS=0)"
                )
            else:
                hint = f"{err.get('Message') or 'request failed'}; check the endpoint, the bucket and the credentials"
            return StorageError(f"S3 refused to {action} {where}: {code} (HTTP {status}): {hint}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageError(
                f"no S3 credentials to {action} {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                f"(or configure an AWS profile or role)"
            )
        if isinstance(exc, EndpointConnectionError | ConnectionClosedError):
            return StorageError(
                f"cannot reach {endpoint} to {action} {where}: check PBS2P_S3_ENDPOINT_URL and the network"
            )
        return StorageError(f"S3 failed to {action} {where}: {exc}")

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except _S3_ERRORS as exc:
            raise self._error(exc, action, key) from exc

    # writing -----------------------------------------------------------------------------------------

    def put_bytes(self, data: bytes, key: str, sha256: str | None = None) -> ObjectInfo:
        self._full(key)  # a bad key is refused before anything else
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is not None and digest != sha256:
            raise ChecksumMismatch(
                f"the data for {self.locate(key)} has sha256 {short(digest)}, expected {short(sha256)}: the "
                f"source changed or is corrupted; nothing was uploaded"
            )
        return self._upload(io.BytesIO(data), key, digest, len(data))

    def put_file(self, local_path: str | os.PathLike[str], key: str, sha256: str | None = None) -> ObjectInfo:
        src = Path(local_path)
        self._full(key)
        where = f"{src} (to upload as {self.locate(key)})"
        try:
            size = src.stat().st_size
            if size <= self.multipart_threshold:  # one request from memory: the bytes hashed are the bytes sent
                return self.put_bytes(src.read_bytes(), key, sha256)
            f = open(src, "rb")  # noqa: SIM115 (closed below; read errors while uploading are told apart)
        except OSError as exc:
            raise StorageError(os_error_message(exc, "read", where)) from exc
        with f:
            try:  # the metadata holds the whole file's sha256, so it is known before the upload starts
                digest = hashlib.file_digest(f, "sha256").hexdigest()
                f.seek(0)
            except OSError as exc:
                raise StorageError(os_error_message(exc, "read", where)) from exc
            if sha256 is not None and digest != sha256:
                raise ChecksumMismatch(
                    f"{src} has sha256 {short(digest)}, expected {short(sha256)}: the source changed or is "
                    f"corrupted; nothing was uploaded to {self.locate(key)}"
                )
            return self._upload(_HashingReader(f, size, digest, str(src), self.locate(key)), key, digest, size)

    def _upload(self, body: IO[bytes] | _HashingReader, key: str, sha256: str, size: int) -> ObjectInfo:
        """One managed upload of `size` bytes: a PUT, or a multipart upload that boto3 aborts on any failure."""
        full = self._full(key)
        extra: dict[str, Any] = {"Metadata": {SHA256_METADATA: sha256}}
        if self.checksums:
            extra["ChecksumAlgorithm"] = "SHA256"  # botocore computes and sends it for each request or part
        try:
            self.client.upload_fileobj(body, self.bucket, full, ExtraArgs=extra, Config=self.transfer)
        except Exception as exc:
            if size >= self.multipart_threshold:
                self._report_open_uploads(full)
            if isinstance(exc, _S3_ERRORS):
                start = getattr(exc, "operation_name", None) == "CreateMultipartUpload"
                raise self._error(exc, "start a multipart upload of" if start else "upload", key) from exc
            raise
        log.debug("uploaded %s (%d bytes)", self.locate(key), size)
        return ObjectInfo(key, size, sha256)

    def _report_open_uploads(self, full: str) -> None:
        """After a failed multipart upload, which boto3 aborts: say so if one of that key is still open."""
        try:
            r = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=full)
        except Exception:  # no bucket, no right to list: the original error says enough
            return
        open_ids = [u.get("UploadId") for u in r.get("Uploads", []) if u.get("Key") == full]
        if open_ids:
            log.error(
                "multipart uploads %s of s3://%s/%s are still open (not aborted, or another writer's): their parts "
                "stay billed until aborted (a lifecycle rule for incomplete uploads cleans them)",
                open_ids,
                self.bucket,
                full,
            )

    # reading -----------------------------------------------------------------------------------------

    def get_file(self, key: str, local_path: str | os.PathLike[str], expected_sha256: str | None = None) -> ObjectInfo:
        full = self._full(key)
        with self._errors("download", key):
            head = self.client.head_object(Bucket=self.bucket, Key=full)
        expected = expected_sha256 or (head.get("Metadata") or {}).get(SHA256_METADATA)

        def fill(fd: int) -> None:
            with open(fd, "r+b", closefd=False) as f, self._errors("download", key):
                self.client.download_fileobj(self.bucket, full, f, Config=self.transfer)

        size, digest = download_to(Path(local_path), fill, expected, self.locate(key))
        return ObjectInfo(key, size, digest)

    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        with self._errors("download", key):
            r = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            try:
                data: bytes = r["Body"].read()
            finally:
                r["Body"].close()
        expected = expected_sha256 or (r.get("Metadata") or {}).get(SHA256_METADATA)
        return verified(data, expected, self.locate(key))

    def exists(self, key: str) -> bool:
        try:
            with self._errors("look up", key):
                self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ObjectNotFound:  # HEAD answers a bare 404; a 403 (no right to look) stays an error
            return False
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = self._full_prefix(prefix)
        skip = len(self.prefix) + 1 if self.prefix else 0
        out: list[ObjectInfo] = []
        with self._errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                out.extend(ObjectInfo(o["Key"][skip:], int(o["Size"])) for o in page.get("Contents", []))
        return sorted(out, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = [i.key for i in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = keys[start : start + 1000]
            with self._errors("delete", prefix):
                r = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": join_key(self.prefix, k)} for k in batch], "Quiet": True},
                )
            errors = r.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"S3 refused to delete {len(errors)} objects under {self.locate(prefix)}, e.g. {first.get('Key')}: "
                    f"{first.get('Code')}; check that these credentials may delete in bucket {self.bucket!r}"
                )
        log.info("deleted %d objects under %s", len(keys), self.locate(prefix))
        return len(keys)

    def url(self, key: str, expires: int = 3600) -> str | None:
        if not 1 <= expires <= 7 * 24 * 3600:
            raise StorageError(f"expires={expires}: a presigned URL lives 1 s to 7 days (604800 s)")
        with self._errors("presign", key):
            url: str = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)}, ExpiresIn=expires
            )
        return url
