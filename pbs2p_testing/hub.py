"""A Hugging Face-compatible hub on 127.0.0.1, for testing the real `huggingface_hub` client without the internet.

It answers the routes the client uses to resolve and fetch a model, as the real hub does:
- `GET /api/models/{org}/{name}/revision/{rev}` (model info; `?blobs=True` adds sizes, blob ids and LFS sha256),
- `GET /api/models/{org}/{name}/tree/{rev}` (the recursive file listing `snapshot_download` reads),
- `HEAD` and `GET /{org}/{name}/resolve/{rev}/{file}` with `X-Repo-Commit`, `ETag` (the sha256 of LFS files, the
  git blob id of others), `Content-Length`, `Accept-Ranges` and `Range` requests (206),
- errors with the `X-Error-Code` the client maps to its exceptions: 401 `RepoNotFound` without a token (a missing
  or private repo look the same), 404 `RepoNotFound` with one, 404 `RevisionNotFound`, 404 `EntryNotFound`,
  401 / 403 `GatedRepo`, 401 for an unknown token.
Files are bytes or paths (served in chunks). `break_once(repo, file)` makes the next GET of that file send half
its body and drop the connection; `fail_once(repo, file)` answers it 500. Every request is recorded
(`requests`), with its Range and whether it carried an Authorization header (never the token itself).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_CHUNK = 1 << 20
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class HubFileData:
    content: bytes | Path
    size: int
    sha256: str
    blob_id: str  # git blob sha1 (of the LFS pointer for LFS files, as on the hub: what matters is it is stable)
    lfs: bool

    @classmethod
    def of(cls, name: str, content: bytes | Path) -> HubFileData:
        sha, size = hashlib.sha256(), 0
        for chunk in _chunks(content, 0):
            sha.update(chunk)
            size += len(chunk)
        lfs = name.endswith(_LFS_SUFFIXES)
        blob = hashlib.sha1(f"blob {size}\0".encode())
        if lfs:
            blob.update(f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha.hexdigest()}\n".encode())
        else:
            for chunk in _chunks(content, 0):
                blob.update(chunk)
        return cls(content, size, sha.hexdigest(), blob.hexdigest(), lfs)


def _chunks(content: bytes | Path, start: int, end: int | None = None) -> Iterator[bytes]:
    if isinstance(content, bytes):
        data = content[start:end]
        for i in range(0, len(data), _CHUNK):
            yield data[i : i + _CHUNK]
        return
    with open(content, "rb") as fh:
        fh.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            chunk = fh.read(_CHUNK if left is None else min(_CHUNK, left))
            if not chunk:
                return
            left = None if left is None else left - len(chunk)
            yield chunk


@dataclass
class HubRepoData:
    commits: dict[str, dict[str, HubFileData]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    private: bool = False
    gated: bool = False
    readers: set[str] = field(default_factory=set)  # tokens that may read it (private or gated)


@dataclass(frozen=True)
class HubRequest:
    method: str
    path: str
    range: str | None
    authorized: bool


class LocalHub:
    """The hub's state; `serve_hub()` runs it over HTTP."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepoData] = {}
        self.tokens: set[str] = set()
        self.requests: list[HubRequest] = []
        self.broken: set[tuple[str, str]] = set()
        self.failing: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()
        self.url = ""

    def add_commit(
        self,
        repo_id: str,
        files: dict[str, bytes | Path],
        *,
        refs: tuple[str, ...] = ("main",),
        private: bool = False,
        gated: bool = False,
        readers: tuple[str, ...] = (),
    ) -> str:
        """Add a commit holding `files` to `repo_id` (created if new), pointed at by `refs`; returns its sha."""
        data = {name: HubFileData.of(name, content) for name, content in sorted(files.items())}
        repo = self.repos.setdefault(repo_id, HubRepoData())
        digest = hashlib.sha1(repr((repo_id, len(repo.commits), [(n, d.sha256) for n, d in data.items()])).encode())
        commit = digest.hexdigest()
        repo.commits[commit] = data
        repo.refs.update({r: commit for r in refs})
        repo.private, repo.gated = repo.private or private, repo.gated or gated
        repo.readers.update(readers)
        self.tokens.update(readers)
        return commit

    def break_once(self, repo_id: str, name: str) -> None:
        """The next GET of this file sends half its body, then drops the connection."""
        self.broken.add((repo_id, name))

    def fail_once(self, repo_id: str, name: str, status: int = 500) -> None:
        """The next GET of this file is answered `status` (a hub having a bad moment)."""
        self.failing[(repo_id, name)] = status

    def got(self, method: str, suffix: str) -> list[HubRequest]:
        """The recorded requests of `method` whose path ends with `suffix`."""
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the tests read `requests`
        pass

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    # -- routing ---------------------------------------------------------------------------------------------
    def _route(self, body: bool) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        parts = url.path.split("/")[1:]  # still quoted: a revision may hold '/' as %2F
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        with hub.lock:
            hub.requests.append(HubRequest(self.command, unquote(url.path), self.headers.get("Range"), bool(token)))
        if token is not None and token not in hub.tokens:
            return self._error(401, None, "Invalid credentials in Authorization header")
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] in ("revision", "tree"):
            repo_id, rev = f"{parts[2]}/{parts[3]}", unquote(parts[5])
            found = self._find(repo_id, rev, token, files=False)
            if found is None:
                return None
            commit, files = found
            if parts[4] == "revision":
                return self._json(self._info(repo_id, commit, files, "blobs" in parse_qs(url.query)), body)
            return self._json([self._tree_entry(n, f) for n, f in files.items()], body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, name = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
            found = self._find(repo_id, rev, token, files=True)
            if found is None:
                return None
            commit, files = found
            if name not in files:
                return self._error(404, "EntryNotFound", f"{name} does not exist on {rev!r}", commit)
            return self._file(repo_id, name, commit, files[name], body)
        return self._error(404, None, "Sorry, we can't find the page you are looking for.")

    def _find(self, repo_id: str, rev: str, token: str | None, files: bool) -> tuple[str, dict[str, Any]] | None:
        hub = self.server.hub
        repo = hub.repos.get(repo_id)
        if repo is None or repo.private and token not in repo.readers:
            # the hub does not tell a missing repo from a private one; without a token it answers 401
            self._error(401 if token is None else 404, "RepoNotFound", "Repository not found")
            return None
        commit = repo.refs.get(rev, rev)
        if commit not in repo.commits:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        if files and repo.gated and token not in repo.readers:
            status = 401 if token is None else 403
            self._error(status, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                        "authorized list.")  # fmt: skip
            return None
        return commit, repo.commits[commit]

    # -- answers ---------------------------------------------------------------------------------------------
    def _info(self, repo_id: str, commit: str, files: dict[str, HubFileData], blobs: bool) -> dict[str, Any]:
        repo = self.server.hub.repos[repo_id]
        siblings = []
        for name, f in files.items():
            s: dict[str, Any] = {"rfilename": name}
            if blobs:
                s.update(size=f.size, blobId=f.blob_id)
                if f.lfs:
                    s["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(s)
        info: dict[str, Any] = {
            "_id": commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": commit,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
        }
        if "config.json" in files and not repo.gated:
            try:
                config = json.loads(b"".join(_chunks(files["config.json"].content, 0)))
                info["config"] = {k: config[k] for k in ("architectures", "model_type", "auto_map") if k in config}
            except (ValueError, TypeError):
                pass
        return info

    @staticmethod
    def _tree_entry(name: str, f: HubFileData) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": name}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
        return entry

    def _json(self, value: Any, body: bool) -> None:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code is not None:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _file(self, repo_id: str, name: str, commit: str, f: HubFileData, body: bool) -> None:
        hub = self.server.hub
        with hub.lock:
            status = hub.failing.pop((repo_id, name), None) if body else None
        if status is not None:
            return self._error(status, None, "Internal Error - We're working hard to fix this as soon as possible!")
        start, end = 0, f.size
        rng = self.headers.get("Range")
        if rng is not None:
            first, _, last = rng.removeprefix("bytes=").partition("-")
            start = int(first)
            end = int(last) + 1 if last else f.size
            if start >= f.size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{f.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(206 if rng is not None else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{f.sha256 if f.lfs else f.blob_id}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        if rng is not None:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{f.size}")
        self.end_headers()
        if not body:
            return
        with hub.lock:
            broken = (repo_id, name) in hub.broken
            hub.broken.discard((repo_id, name))
        stop = start + (end - start) // 2 if broken else end
        for chunk in _chunks(f.content, start, stop):
            self.wfile.write(chunk)
        if broken:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: LocalHub) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub

    def handle_error(self, request: Any, client_address: Any) -> None:  # a dropped connection (break_once)
        pass


@contextmanager
def serve_hub(hub: LocalHub | None = None) -> Iterator[LocalHub]:
    """`hub` (a new one by default) over HTTP on a free port of 127.0.0.1, in a thread; `hub.url` is its address."""
    hub = hub or LocalHub()
    server = _Server(hub)
    thread = threading.Thread(target=server.serve_forever, name="local-hub", daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def model_files(model_dir: Path) -> dict[str, bytes | Path]:
    """Every file of a model directory (not hidden ones), as `add_commit` takes them."""
    return {p.name: p for p in sorted(model_dir.iterdir()) if p.is_file() and not p.name.startswith(".")}
