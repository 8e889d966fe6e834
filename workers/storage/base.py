"""What every backend shares: keys and prefixes, errors, `ObjectInfo`, the `Storage` interface with its
directory upload and download, and atomic writes of local files (a temp file beside the target, renamed)."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pbs2p.core.errors import Pbs2pError
from pbs2p.core.format import MANIFEST_FILE

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PARTIAL_SUFFIX = ".pbs2p-partial"  # temp files of local writes; never a key, never listed

_CHUNK = 1 * MiB
_HEX64 = re.compile(r"[0-9a-f]{64}")


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
    if key.endswith(PARTIAL_SUFFIX):
        raise StorageError(f"{what} {key!r} ends with {PARTIAL_SUFFIX!r}, reserved for temp files; rename it")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix is empty (everything) or a key, optionally ending with '/'."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix, "prefix")
    return prefix


def join_key(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix.rstrip("/") else name


def folder(prefix: str) -> str:
    """The prefix as a folder: '' stays '', 'a/b' becomes 'a/b/'."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


# ---------------------------------------------------------------------------------------------- messages


def short(digest: str | None) -> str:
    return f"{digest[:12]}…" if digest else "?"


def mismatch(where: str, got: str, expected: str) -> ChecksumMismatch:
    return ChecksumMismatch(
        f"{where} fails its sha256 check (got {short(got)}, expected {short(expected)}): the object is "
        f"corrupted or was overwritten; upload it again"
    )


def verified(data: bytes, expected_sha256: str | None, where: str) -> bytes:
    """`data`, after checking it against `expected_sha256` when one is known (ChecksumMismatch if it differs)."""
    if expected_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256:
            raise mismatch(where, digest, expected_sha256)
    return data


def os_error_message(exc: OSError, action: str, where: str) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "no space left on the device (or quota exceeded); free space there or point the storage URL elsewhere"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "permission denied; make the storage directory writable by this user or point the storage URL elsewhere"
    else:
        hint = exc.strerror or str(exc)
    return f"cannot {action} {where}: {hint}"


# ---------------------------------------------------------------------------------------------- local files


def read_source(f: IO[bytes], where: str) -> Iterator[bytes]:
    """Chunks of a file being copied; a read error is named as one (not taken for a failed write)."""
    try:
        while chunk := f.read(_CHUNK):
            yield chunk
    except OSError as exc:
        raise StorageError(os_error_message(exc, "read", where)) from exc


def write_all(fd: int, chunks: Iterable[bytes]) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:  # os.write may write less than asked
            n = os.write(fd, view)
            view = view[n:]


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


def atomic_write(
    dest: Path, fill: Callable[[int], None], check: Callable[[int, str], None] | None = None
) -> tuple[int, str]:
    """Create a temp file beside `dest`, let `fill(fd)` write it, fsync, hash what landed on disk, call
    `check(size, sha256)`, rename into place; returns (size, sha256).

    On any failure (an OSError from the disk, a failed check, an error from `fill`) the temp file is removed
    and the exception propagates: `dest` is either the old file, untouched, or the complete new one.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=PARTIAL_SUFFIX)
    try:
        try:
            fill(fd)
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
            with open(fd, "rb", closefd=False) as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if check is not None:
            check(size, digest)
        os.replace(tmp, dest)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)
    return size, digest


def download_to(dest: Path, fill: Callable[[int], None], expected: str | None, where: str) -> tuple[int, str]:
    """`atomic_write` of a download from `where` into the caller's path, verified against `expected` (a
    mismatch writes nothing); disk errors named."""

    def check(size: int, digest: str) -> None:
        if expected is not None and digest != expected:
            raise mismatch(where, digest, expected)

    try:
        return atomic_write(dest, fill, check)
    except OSError as exc:
        raise StorageError(os_error_message(exc, "write", f"{dest} (downloading {where})")) from exc


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
        manifest_name: str = MANIFEST_FILE,
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
            p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file() and not p.name.endswith(PARTIAL_SUFFIX)
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
            files = {i.key[len(folder(prefix)) :]: {"size": i.size, "sha256": i.sha256} for i in written}
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
        self, prefix: str, local_dir: str | os.PathLike[str], manifest_name: str = MANIFEST_FILE
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
            names = [i.key[len(folder(prefix)) :] for i in self.list(folder(prefix))]
            if not names:
                raise ObjectNotFound(f"nothing under {self.locate(folder(prefix))}; check the prefix")
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
            body = manifest_bytes
            try:
                atomic_write(dest / manifest_name, lambda fd: write_all(fd, [body]))
            except OSError as exc:
                raise StorageError(os_error_message(exc, "write", str(dest / manifest_name))) from exc
            got.append(ObjectInfo(manifest_key, len(manifest_bytes), hashlib.sha256(manifest_bytes).hexdigest()))
        log.info("downloaded %d files from %s to %s, verified", len(got), self.locate(prefix), dest)
        return got
