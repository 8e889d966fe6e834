"""Object storage for artifacts and checkpoints: one interface, two backends (a local directory, any S3 API).

What both backends guarantee:
- Nothing half-written under a final key. A local write goes to a temp file in the same directory, is
  fsynced and renamed into place; an S3 PUT is atomic, and a failed multipart upload is aborted.
- Content is checked by sha256. An S3 object carries the sha256 of its whole content as metadata
  (`x-amz-meta-sha256`) and, where the server supports it, SHA256 checksums per request or part; a read
  verifies against an expected digest (given, from the metadata, or from a manifest).
- A directory goes up file by file with its manifest LAST, after any older manifest under the prefix is
  removed: a reader that sees a manifest sees a complete artifact. It comes down verified against the
  manifest's per-file size and sha256, with the manifest again written last.

Keys are relative paths ("jobs/42/manifest.json"): no leading "/", no empty, "." or ".." segment.
`list` and `delete_prefix` match keys by string prefix, as S3 does: end the prefix with "/" to mean a folder.

Modules: `base` (keys, errors, `ObjectInfo`, the `Storage` interface with `upload_dir` / `download_dir`,
atomic local writes), `local` (`LocalStorage`), `s3_settings` (`S3Settings`), `s3` (`S3Storage` on boto3's managed
transfers; imported when an s3:// URL is opened, so that the rest works without the `s3` extra).
No module reads the environment: S3 settings come in as an `S3Settings`, built by the entry points.
"""

from __future__ import annotations

import os
import re
import urllib.parse

from pbs2p.core.errors import requires_extra

from .base import (
    ChecksumMismatch,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageError,
    check_key,
    check_prefix,
    join_key,
)
from .local import LocalStorage
from .s3_settings import S3Settings

__all__ = [
    "ACCEPTED_URLS",
    "ChecksumMismatch",
    "LocalStorage",
    "ObjectInfo",
    "ObjectNotFound",
    "S3Settings",
    "Storage",
    "StorageError",
    "check_key",
    "check_prefix",
    "join_key",
    "storage_from_url",
]

ACCEPTED_URLS = "a local directory (/data/pbs2p or file:///data/pbs2p) or s3://BUCKET/PREFIX"

_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")


def storage_from_url(url: str | os.PathLike[str], s3: S3Settings | None = None) -> Storage:
    """`/path`, `file:///path` -> LocalStorage; `s3://bucket/prefix` -> S3Storage with the settings `s3`.

    Without `s3`, the defaults of S3Settings (the environment is not read here: build `S3Settings()` where the
    program starts and pass it). The settings are ignored for a local directory.
    """
    text = os.fspath(url).strip()
    if not text:
        raise StorageError(f"empty storage URL; give {ACCEPTED_URLS}")
    scheme_match = _URL_SCHEME.match(text)
    if scheme_match is None:  # a plain path
        return LocalStorage(text)
    scheme = scheme_match.group(1).lower()
    if not text[scheme_match.end() :].startswith("//"):
        raise StorageError(f"storage URL {text!r} is malformed (missing '//'); give {ACCEPTED_URLS}")
    if scheme == "file":
        parsed = urllib.parse.urlparse(text)
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise StorageError(f"storage URL {text!r} needs an absolute path with three slashes: file:///data/pbs2p")
        return LocalStorage(urllib.parse.unquote(parsed.path))
    if scheme == "s3":
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not bucket:
            raise StorageError(f"storage URL {text!r} names no bucket; use s3://BUCKET/PREFIX")
        with requires_extra("s3", f"storage URL {text!r}"):
            from .s3 import S3Storage  # extra: s3
        return S3Storage.from_settings(bucket, prefix, s3 if s3 is not None else S3Settings.defaults())
    raise StorageError(f"storage URL {text!r} has the unsupported scheme {scheme!r}; give {ACCEPTED_URLS}")
