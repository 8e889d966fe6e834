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
"""

from __future__ import annotations

import base64
import builtins
import errno
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from pbs2p_core.errors import Pbs2pError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
S3_MIN_PART_SIZE = 5 * MiB  # S3 refuses smaller parts (except the last one)
S3_MAX_PARTS = 10_000
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_PART_SIZE = 64 * MiB
MANIFEST_NAME = "manifest.json"
SHA256_METADATA = "sha256"  # sent as the header x-amz-meta-sha256
ACCEPTED_URLS = "a local directory (/data/pbs2p or file:///data/pbs2p) or s3://BUCKET/PREFIX"

_CHUNK = 1 * MiB
_PARTIAL_SUFFIX = ".pbs2p-partial"  # temp files of local writes; never a key, never listed
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")


class StorageError(Pbs2pError):
    """Storage failed or refused: the message names the key and says what to check."""


class ObjectNotFound(StorageError):
    """No object under that key."""


class ChecksumMismatch(StorageError):
    """Content whose sha256 (or size) differs from what was expected: corrupted or changed."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None = None  # hex digest; None where a listing does not carry it


# ---------------------------------------------------------------------------------------------- keys


def check_key(key: str, what: str = "object key") -> str:
    """A key is a relative path inside the storage root; anything that could escape it is refused."""
    example = "use a relative path such as 'jobs/42/manifest.json'"
    if not isinstance(key, str) or not key:
        raise StorageError(f"empty {what}; {example}")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise StorageError(f"{what} {key!r} is absolute or holds a backslash or NUL; {example}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise StorageError(f"{what} {key!r} has an empty, '.' or '..' segment; {example}")
    if key.endswith(_PARTIAL_SUFFIX):
        raise StorageError(f"{what} {key!r} ends with {_PARTIAL_SUFFIX!r}, reserved for temp files; rename it")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix is empty (everything) or a key, optionally ending with '/'."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix, "prefix")
    return prefix


def join_key(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix.rstrip("/") else name


def _folder(prefix: str) -> str:
    """The prefix as a folder: '' stays '', 'a/b' becomes 'a/b/'."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_chunks(f: IO[bytes], size: int = _CHUNK) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


def _read_source(f: IO[bytes], where: str) -> Iterator[bytes]:
    """Chunks of a file being copied; a read error is named as one (not taken for a failed write)."""
    try:
        yield from _read_chunks(f)
    except OSError as exc:
        raise StorageError(_os_error_message(exc, "read", where)) from exc


def _short(digest: str | None) -> str:
    return f"{digest[:12]}…" if digest else "?"


def _mismatch(where: str, got: str, expected: str) -> ChecksumMismatch:
    return ChecksumMismatch(
        f"{where} fails its sha256 check (got {_short(got)}, expected {_short(expected)}): the object is "
        f"corrupted or was overwritten; upload it again"
    )


def _os_error_message(exc: OSError, action: str, where: str) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "no space left on the device (or quota exceeded); free space there or point the storage URL elsewhere"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "permission denied; make the storage directory writable by this user or point the storage URL elsewhere"
    else:
        hint = exc.strerror or str(exc)
    return f"cannot {action} {where}: {hint}"


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (the directory entry), where the filesystem allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.debug("fsync of directory %s failed (%s); the rename is done but may not be durable yet", path, exc)
    finally:
        os.close(fd)


def _atomic_write(
    dest: Path, chunks: Iterable[bytes], check: Callable[[int, str], None] | None = None
) -> tuple[int, str]:
    """Write `chunks` to a temp file beside `dest`, fsync, call `check(size, sha256)`, rename into place.

    On any failure (an OSError from the disk, a failed check, an error from `chunks`) the temp file is
    removed and the exception propagates: `dest` is either the old file, untouched, or the complete new one.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=_PARTIAL_SUFFIX)
    try:
        h = hashlib.sha256()
        size = 0
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:  # os.write may write less than asked
                    n = os.write(fd, view)
                    view = view[n:]
                h.update(chunk)
                size += len(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        digest = h.hexdigest()
        if check is not None:
            check(size, digest)
        os.replace(tmp, dest)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)
    return size, digest


def _files_table(manifest: bytes, where: str) -> dict[str, dict[str, Any]]:
    """The manifest's `files` table ({name: {"size", "sha256"}}), checked enough to verify downloads against."""
    try:
        doc = json.loads(manifest)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(
            f"{where} is not valid JSON ({exc}); the manifest is damaged, upload the artifact again"
        ) from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        raise StorageError(f"{where} has no 'files' table ({{name: {{size, sha256}}}}); cannot verify the files")
    for name, entry in files.items():
        check_key(name, f"file name in {where}")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _HEX64.fullmatch(entry["sha256"])):
            raise StorageError(f"{where}: the entry for {name!r} has no valid sha256; the manifest is damaged")
    return files


# ---------------------------------------------------------------------------------------------- interface


class Storage(ABC):
    """Where artifacts and checkpoints live. Keys are relative to the storage's root (directory or S3 prefix)."""

    @abstractmethod
    def locate(self, key: str) -> str:
        """Where a key lives, for messages: a path or s3://bucket/key."""

    @abstractmethod
    def put_file(self, local_path: str | os.PathLike[str], key: str, sha256: str | None = None) -> ObjectInfo:
        """Store a local file under `key`. Given `sha256`, the bytes sent must have it (else ChecksumMismatch)."""

    @abstractmethod
    def put_bytes(self, data: bytes, key: str, sha256: str | None = None) -> ObjectInfo: ...

    @abstractmethod
    def get_file(self, key: str, local_path: str | os.PathLike[str], expected_sha256: str | None = None) -> ObjectInfo:
        """Fetch `key` into `local_path` (atomically), verified against `expected_sha256` or the object's
        own sha256 where the backend stores one. A mismatch raises ChecksumMismatch and writes nothing."""

    @abstractmethod
    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with `prefix`, sorted by key (sha256 is None: listings don't carry it)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; a missing one is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with `prefix`; returns how many."""

    @abstractmethod
    def url(self, key: str, expires: int = 3600) -> str | None:
        """A URL a plain HTTP client can GET (presigned for S3), a file:// URL for a local store."""

    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        prefix: str,
        manifest_name: str = MANIFEST_NAME,
        on_put: Callable[[ObjectInfo], None] | None = None,
    ) -> builtins.list[ObjectInfo]:
        """Upload every file of `local_dir` under `prefix`, the manifest last; returns the objects written.

        If the directory holds `manifest_name` (a pbs2p artifact does), it is uploaded as is, and each file
        it lists must match its sha256 as it goes up. Otherwise a manifest `{"files": {name: {size, sha256}}}`
        is written. An older manifest under the prefix is removed first, so no reader pairs it with new files.
        """
        src = Path(local_dir)
        if not src.is_dir():
            raise StorageError(f"{src} is not a directory; give the directory to upload")
        check_prefix(prefix)
        check_key(manifest_name, "manifest name")
        names = sorted(
            p.relative_to(src).as_posix()
            for p in src.rglob("*")
            if p.is_file() and not p.name.endswith(_PARTIAL_SUFFIX)
        )
        for name in names:
            check_key(name, f"file name under {src}")
        data_names = [n for n in names if n != manifest_name]
        manifest_bytes: bytes | None = None
        table: dict[str, dict[str, Any]] = {}
        if manifest_name in names:
            manifest_bytes = (src / manifest_name).read_bytes()
            table = _files_table(manifest_bytes, str(src / manifest_name))
            missing = sorted(set(table) - set(data_names))
            if missing:
                raise StorageError(
                    f"{src / manifest_name} lists {missing[:5]} but {src} lacks them; the local artifact is "
                    f"incomplete, write it again"
                )
            unlisted = sorted(set(data_names) - set(table))
            if unlisted:
                log.warning(
                    "%s: %d file(s) not in %s are uploaded unverified: %s",
                    src,
                    len(unlisted),
                    manifest_name,
                    unlisted[:5],
                )

        manifest_key = join_key(prefix, manifest_name)
        if self.exists(manifest_key):
            log.info("removing the old manifest %s before uploading new files", self.locate(manifest_key))
            self.delete(manifest_key)
        written: list[ObjectInfo] = []
        for name in data_names:
            expected = table[name]["sha256"] if name in table else None
            info = self.put_file(src / name, join_key(prefix, name), sha256=expected)
            written.append(info)
            if on_put is not None:
                on_put(info)
        if manifest_bytes is None:
            files = {i.key[len(_folder(prefix)) :]: {"size": i.size, "sha256": i.sha256} for i in written}
            manifest_bytes = (json.dumps({"files": files}, indent=1, sort_keys=True) + "\n").encode()
        info = self.put_bytes(manifest_bytes, manifest_key)  # last: the artifact is complete from here on
        written.append(info)
        if on_put is not None:
            on_put(info)
        total = sum(i.size for i in written)
        log.info(
            "uploaded %d files (%d bytes) from %s to %s, manifest last", len(written), total, src, self.locate(prefix)
        )
        return written

    def download_dir(
        self, prefix: str, local_dir: str | os.PathLike[str], manifest_name: str = MANIFEST_NAME
    ) -> builtins.list[ObjectInfo]:
        """Download the files under `prefix` into `local_dir`, each verified against the manifest (size and
        sha256); the manifest is written last. Without a manifest, every object under the prefix is fetched,
        verified only where the backend stores a sha256."""
        check_prefix(prefix)
        dest = Path(local_dir)
        manifest_key = join_key(prefix, manifest_name)
        try:
            manifest_bytes: bytes | None = self.get_bytes(manifest_key)
        except ObjectNotFound:
            manifest_bytes = None
        table: dict[str, dict[str, Any]] = {}
        if manifest_bytes is not None:
            table = _files_table(manifest_bytes, self.locate(manifest_key))
            names = sorted(table)
        else:
            folder = _folder(prefix)
            names = [i.key[len(folder) :] for i in self.list(folder)]
            if not names:
                raise ObjectNotFound(f"nothing under {self.locate(folder)}; check the prefix")
            log.warning(
                "%s is missing: downloading %d objects with nothing to check them against",
                self.locate(manifest_key),
                len(names),
            )
        stale = dest / manifest_name
        if manifest_bytes is not None and stale.is_file():  # an older download's manifest must not vouch for new files
            stale.unlink()
        got: list[ObjectInfo] = []
        for name in names:
            check_key(name, "file name")  # names come from the store: never write outside local_dir
            key = join_key(prefix, name)
            entry = table.get(name, {})
            target = dest / name
            info = self.get_file(key, target, expected_sha256=entry.get("sha256"))
            if "size" in entry and info.size != entry["size"]:
                target.unlink(missing_ok=True)
                raise ChecksumMismatch(f"{self.locate(key)} has {info.size} bytes, the manifest says {entry['size']}")
            got.append(info)
        if manifest_bytes is not None:
            try:
                _atomic_write(dest / manifest_name, [manifest_bytes])
            except OSError as exc:
                raise StorageError(_os_error_message(exc, "write", str(dest / manifest_name))) from exc
            got.append(ObjectInfo(manifest_key, len(manifest_bytes), hashlib.sha256(manifest_bytes).hexdigest()))
        log.info("downloaded %d files from %s to %s, verified", len(got), self.locate(prefix), dest)
        return got


def _download_check(where: str, expected: str | None) -> Callable[[int, str], None]:
    def check(size: int, digest: str) -> None:
        if expected is not None and digest != expected:
            raise _mismatch(where, digest, expected)

    return check


def _local_write(dest: Path, chunks: Iterable[bytes], expected: str | None, where: str) -> tuple[int, str]:
    """`_atomic_write` of a download into the caller's path; disk errors named."""
    try:
        return _atomic_write(dest, chunks, _download_check(where, expected))
    except OSError as exc:
        raise StorageError(_os_error_message(exc, "write", f"{dest} (downloading {where})")) from exc


# ---------------------------------------------------------------------------------------------- local


class LocalStorage(Storage):
    """A directory. The embedded default: one machine, nothing to set up."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        check_key(key)
        path = self.root / key
        real_root = os.path.realpath(self.root)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise StorageError(f"object key {key!r} leads outside {self.root} (through a symlink); use another key")
        return path

    def locate(self, key: str) -> str:
        return str(self.root / key) if key else str(self.root)

    def _put(self, chunks: Iterable[bytes], key: str, sha256: str | None) -> ObjectInfo:
        path = self._path(key)

        def check(size: int, digest: str) -> None:
            if sha256 is not None and digest != sha256:
                raise ChecksumMismatch(
                    f"the data for {key!r} has sha256 {_short(digest)}, expected {_short(sha256)}: the source "
                    f"changed or is corrupted; nothing was written"
                )

        try:
            size, digest = _atomic_write(path, chunks, check)
        except OSError as exc:
            raise StorageError(_os_error_message(exc, f"write {key!r} to", str(self.root))) from exc
        log.debug("stored %s (%d bytes)", path, size)
        return ObjectInfo(key, size, digest)

    def put_file(self, local_path: str | os.PathLike[str], key: str, sha256: str | None = None) -> ObjectInfo:
        src = Path(local_path)
        try:
            f = open(src, "rb")  # noqa: SIM115 (closed below; opened apart to tell read errors from write errors)
        except OSError as exc:
            raise StorageError(_os_error_message(exc, "read", f"{src} (to store as {key!r})")) from exc
        with f:
            return self._put(_read_source(f, str(src)), key, sha256)

    def put_bytes(self, data: bytes, key: str, sha256: str | None = None) -> ObjectInfo:
        return self._put([bytes(data)], key, sha256)

    def _open(self, key: str) -> IO[bytes]:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.root}; check the key and the storage URL") from None
        except OSError as exc:
            raise StorageError(_os_error_message(exc, "read", str(path))) from exc

    def get_file(self, key: str, local_path: str | os.PathLike[str], expected_sha256: str | None = None) -> ObjectInfo:
        with self._open(key) as f:
            size, digest = _local_write(
                Path(local_path), _read_source(f, self.locate(key)), expected_sha256, self.locate(key)
            )
        return ObjectInfo(key, size, digest)

    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        with self._open(key) as f:
            data = f.read()
        if expected_sha256 is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected_sha256:
                raise _mismatch(self.locate(key), digest, expected_sha256)
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        out: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(base):  # symlinked folders are not followed
            rel = Path(dirpath).relative_to(self.root).as_posix()
            rel = "" if rel == "." else rel
            dirnames[:] = sorted(d for d in dirnames if (join_key(rel, d) + "/").startswith(prefix))
            for name in filenames:
                key = join_key(rel, name)
                path = Path(dirpath) / name
                if name.endswith(_PARTIAL_SUFFIX) or not key.startswith(prefix) or not path.is_file():
                    continue
                out.append(ObjectInfo(key, path.stat().st_size))
        return sorted(out, key=lambda i: i.key)

    def _prune(self, folder: Path) -> None:
        """Remove folders left empty, up to the root."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(_os_error_message(exc, "delete", str(path))) from exc
        self._prune(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        infos = self.list(prefix)
        for info in infos:
            self.delete(info.key)
        log.info("deleted %d objects under %s", len(infos), self.locate(prefix))
        return len(infos)

    def url(self, key: str, expires: int = 3600) -> str | None:
        return self._path(key).as_uri()


# ---------------------------------------------------------------------------------------------- S3


# refusals that mean "your checksum is wrong" (or "I don't do checksums")
_CHECKSUM_CODES = ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidRequest", "NotImplemented")


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


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
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
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
            # checksums are sent explicitly (SHA256, below) or not at all: some S3-compatible servers reject
            # the CRC32 trailers that botocore would otherwise add to every upload
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client: Any = session.client("s3", endpoint_url=endpoint_url, region_name=self.region, config=config)

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
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, action, key) from exc

    # writing -----------------------------------------------------------------------------------------

    def put_bytes(self, data: bytes, key: str, sha256: str | None = None) -> ObjectInfo:
        full = self._full(key)
        h = hashlib.sha256(data)
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise ChecksumMismatch(
                f"the data for {self.locate(key)} has sha256 {_short(digest)}, expected {_short(sha256)}: the "
                f"source changed or is corrupted; nothing was uploaded"
            )
        if len(data) > self.multipart_threshold:
            return self._multipart(key, self._split(data), digest, f"the data for {key!r}")
        extra = {"ChecksumSHA256": _b64(h.digest())} if self.checksums else {}
        with self._errors("upload", key):
            self.client.put_object(
                Bucket=self.bucket, Key=full, Body=bytes(data), Metadata={SHA256_METADATA: digest}, **extra
            )
        log.debug("uploaded %s (%d bytes)", self.locate(key), len(data))
        return ObjectInfo(key, len(data), digest)

    def put_file(self, local_path: str | os.PathLike[str], key: str, sha256: str | None = None) -> ObjectInfo:
        src = Path(local_path)
        try:
            size = src.stat().st_size
            if size <= self.multipart_threshold:
                return self.put_bytes(src.read_bytes(), key, sha256)
            # the whole file's sha256 goes into the metadata, which is fixed when the upload starts
            whole = sha256 or _sha256_file(src)
            f = open(src, "rb")  # noqa: SIM115 (closed below; read errors while uploading are told apart)
        except OSError as exc:
            raise StorageError(_os_error_message(exc, "read", f"{src} (to upload as {self.locate(key)})")) from exc
        with f:
            return self._multipart(key, self._iter_parts(f, self._part_size(size)), whole, str(src))

    def _part_size(self, size: int) -> int:
        """The configured part size, grown (in whole MiB) where the file would need more than 10,000 parts."""
        return max(self.part_size, math.ceil(size / S3_MAX_PARTS / MiB) * MiB)

    def _iter_parts(self, f: IO[bytes], part_size: int) -> Iterator[bytes]:
        """The parts of a multipart upload, read from `f` one at a time (one part in memory)."""
        return _read_chunks(f, part_size)

    def _split(self, data: bytes) -> Iterator[bytes]:
        step = self._part_size(len(data))
        for i in range(0, len(data), step):
            yield data[i : i + step]

    def _multipart(self, key: str, parts: Iterable[bytes], sha256: str, source: str) -> ObjectInfo:
        """Upload `parts` as one object; any failure aborts the upload, so no parts linger and nothing
        appears under the key. The bytes sent must hash to `sha256` (the metadata), else it is aborted too."""
        full = self._full(key)
        algo = {"ChecksumAlgorithm": "SHA256"} if self.checksums else {}
        with self._errors("start a multipart upload of", key):
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=full, Metadata={SHA256_METADATA: sha256}, **algo
            )["UploadId"]
        try:
            h = hashlib.sha256()
            size = 0
            done: list[dict[str, Any]] = []
            for number, chunk in enumerate(parts, start=1):
                h.update(chunk)
                size += len(chunk)
                extra = {"ChecksumSHA256": _b64(hashlib.sha256(chunk).digest())} if self.checksums else {}
                r = self.client.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=chunk, **extra
                )
                done.append({"PartNumber": number, "ETag": r["ETag"], **extra})
                log.debug("uploaded part %d of %s (%d bytes)", number, self.locate(key), len(chunk))
            if h.hexdigest() != sha256:
                raise ChecksumMismatch(
                    f"{source} has sha256 {_short(h.hexdigest())} while uploaded, expected {_short(sha256)}: it "
                    f"changed or is corrupted; the upload to {self.locate(key)} was aborted"
                )
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": done}
            )
        except BaseException as exc:
            self._abort(full, upload_id)
            if isinstance(exc, ClientError | BotoCoreError):
                raise self._error(exc, "upload", key) from exc
            if isinstance(exc, OSError):
                msg = _os_error_message(exc, "read", f"{source} (uploading to {self.locate(key)})")
                raise StorageError(f"{msg}; the multipart upload was aborted") from exc
            raise
        log.debug("uploaded %s in %d parts (%d bytes)", self.locate(key), len(done), size)
        return ObjectInfo(key, size, sha256)

    def _abort(self, full: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            log.info("aborted multipart upload %s of s3://%s/%s", upload_id, self.bucket, full)
        except Exception as exc:  # the original error matters more; say what is left behind
            log.error(
                "could not abort multipart upload %s of s3://%s/%s (%s): its parts stay billed until aborted "
                "(a lifecycle rule for incomplete uploads cleans them)",
                upload_id,
                self.bucket,
                full,
                exc,
            )

    # reading -----------------------------------------------------------------------------------------

    def _get(self, key: str) -> tuple[Any, str | None]:
        """The streaming body of `key` and the sha256 stored with it (None for objects we did not write)."""
        with self._errors("download", key):
            r = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
        return r["Body"], (r.get("Metadata") or {}).get(SHA256_METADATA)

    def get_file(self, key: str, local_path: str | os.PathLike[str], expected_sha256: str | None = None) -> ObjectInfo:
        body, stored = self._get(key)
        with self._errors("download", key):
            try:
                chunks = iter(lambda: body.read(_CHUNK), b"")
                size, digest = _local_write(Path(local_path), chunks, expected_sha256 or stored, self.locate(key))
            finally:
                body.close()
        return ObjectInfo(key, size, digest)

    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        body, stored = self._get(key)
        with self._errors("download", key):
            try:
                data: bytes = body.read()
            finally:
                body.close()
        expected = expected_sha256 or stored
        if expected is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected:
                raise _mismatch(self.locate(key), digest, expected)
        return data

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


# ---------------------------------------------------------------------------------------------- from a URL

_S3_SETTINGS = (
    "endpoint_url",
    "region",
    "access_key",
    "secret_key",
    "session_token",
    "path_style",
    "multipart_threshold",
    "part_size",
    "checksums",
    "max_attempts",
)


def _env_bool(name: str, default: bool, env: Mapping[str, str]) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise StorageError(f"{name}={raw!r} is not a boolean; use 1 or 0 (true/false)")


def storage_from_url(url: str | os.PathLike[str], **settings: Any) -> Storage:
    """`/path`, `file:///path` -> LocalStorage; `s3://bucket/prefix` -> S3Storage.

    S3 settings (keyword arguments; None means unset) fall back to the environment: PBS2P_S3_ENDPOINT_URL,
    PBS2P_S3_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, PBS2P_S3_PATH_STYLE,
    PBS2P_S3_CHECKSUMS. They are ignored for a local directory.
    """
    unknown = sorted(set(settings) - set(_S3_SETTINGS))
    if unknown:
        raise StorageError(f"unknown storage settings {unknown}; known: {', '.join(_S3_SETTINGS)}")
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
        env = os.environ
        opts = {k: v for k, v in settings.items() if v is not None}
        opts.setdefault("endpoint_url", env.get("PBS2P_S3_ENDPOINT_URL") or None)
        opts.setdefault("region", env.get("PBS2P_S3_REGION") or None)
        opts.setdefault("access_key", env.get("AWS_ACCESS_KEY_ID") or None)
        opts.setdefault("secret_key", env.get("AWS_SECRET_ACCESS_KEY") or None)
        opts.setdefault("session_token", env.get("AWS_SESSION_TOKEN") or None)
        opts.setdefault("path_style", _env_bool("PBS2P_S3_PATH_STYLE", False, env))
        opts.setdefault("checksums", _env_bool("PBS2P_S3_CHECKSUMS", True, env))
        return S3Storage(bucket, prefix, **opts)
    raise StorageError(f"storage URL {text!r} has the unsupported scheme {scheme!r}; give {ACCEPTED_URLS}")
