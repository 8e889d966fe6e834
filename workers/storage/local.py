"""`LocalStorage`: a directory. Every write goes to a temp file beside its target, fsynced and renamed."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from .base import (
    PARTIAL_SUFFIX,
    ChecksumMismatch,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageError,
    atomic_write,
    check_key,
    check_prefix,
    download_to,
    join_key,
    os_error_message,
    read_source,
    short,
    verified,
    write_all,
)

log = logging.getLogger(__name__)


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
                    f"the data for {key!r} has sha256 {short(digest)}, expected {short(sha256)}: the source "
                    f"changed or is corrupted; nothing was written"
                )

        try:
            size, digest = atomic_write(path, lambda fd: write_all(fd, chunks), check)
        except OSError as exc:
            raise StorageError(os_error_message(exc, f"write {key!r} to", str(self.root))) from exc
        log.debug("stored %s (%d bytes)", path, size)
        return ObjectInfo(key, size, digest)

    def put_file(self, local_path: str | os.PathLike[str], key: str, sha256: str | None = None) -> ObjectInfo:
        src = Path(local_path)
        try:
            f = open(src, "rb")  # noqa: SIM115 (closed below; opened apart to tell read errors from write errors)
        except OSError as exc:
            raise StorageError(os_error_message(exc, "read", f"{src} (to store as {key!r})")) from exc
        with f:
            return self._put(read_source(f, str(src)), key, sha256)

    def put_bytes(self, data: bytes, key: str, sha256: str | None = None) -> ObjectInfo:
        return self._put([bytes(data)], key, sha256)

    def _open(self, key: str) -> IO[bytes]:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.root}; check the key and the storage URL") from None
        except OSError as exc:
            raise StorageError(os_error_message(exc, "read", str(path))) from exc

    def get_file(self, key: str, local_path: str | os.PathLike[str], expected_sha256: str | None = None) -> ObjectInfo:
        where = self.locate(key)
        with self._open(key) as f:
            size, digest = download_to(
                Path(local_path), lambda fd: write_all(fd, read_source(f, where)), expected_sha256, where
            )
        return ObjectInfo(key, size, digest)

    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        with self._open(key) as f:
            return verified(f.read(), expected_sha256, self.locate(key))

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
                if name.endswith(PARTIAL_SUFFIX) or not key.startswith(prefix) or not path.is_file():
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
            raise StorageError(os_error_message(exc, "delete", str(path))) from exc
        self._prune(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        infos = self.list(prefix)
        for info in infos:
            self.delete(info.key)
        log.info("deleted %d objects under %s", len(infos), self.locate(prefix))
        return len(infos)

    def url(self, key: str, expires: int = 3600) -> str | None:
        return self._path(key).as_uri()
