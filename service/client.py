"""A small HTTP client of the API (httpx), used by `pbs2p jobs ...` and the demo."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from pbs2p.core.errors import Pbs2pError
from pbs2p.core.format import MANIFEST_FILE, verify_artifact

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


class ApiError(Pbs2pError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


class Client:
    def __init__(self, url: str, key: str, timeout: float = 30.0) -> None:
        if not key:
            raise Pbs2pError(
                "no API key: pass --key or set PBS2P_API_KEY (create one: pbs2p keys create --tenant NAME)"
            )
        self.http = httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        for attempt in range(3 if method == "GET" else 1):  # a GET is safe to repeat after a dropped connection
            try:
                resp = self.http.request(method, path, **kw)
                break
            except httpx.TransportError as exc:
                if attempt == (2 if method == "GET" else 0):
                    raise Pbs2pError(f"cannot reach the service at {self.http.base_url}: {exc}") from exc
                time.sleep(0.2 * (attempt + 1))
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail") or resp.text
            except ValueError:
                detail = resp.text
            raise ApiError(resp.status_code, str(detail))
        return resp

    def submit(
        self,
        model: str,
        config: dict[str, Any],
        evaluate: dict[str, Any] | None = None,
        name: str | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        webhook_url: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "config": config}
        if evaluate is not None:
            body["evaluate"] = evaluate
        if name:
            body["name"] = name
        if priority:
            body["priority"] = priority
        if webhook_url:
            body["webhook_url"] = webhook_url
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=body, headers=headers).json()

    def get(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def report(self, job_id: str) -> dict[str, Any]:
        """A SUCCEEDED job's report (metrics, timings, per block N and each linear's error); ApiError 409 before."""
        return self._call("GET", f"/v1/jobs/{job_id}/report").json()

    def iter_jobs(self, states: tuple[str, ...] = (), page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every job of the caller (with one of `states`, if given), newest first, page after page (it follows
        `next_cursor` until the last page; jobs submitted meanwhile are newer than the cursor and not repeated)."""
        params: dict[str, Any] = {"state": list(states), "limit": page_size}
        while True:
            page = self._call("GET", "/v1/jobs", params=params).json()
            yield from page["jobs"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def list_jobs(self, states: tuple[str, ...] = (), limit: int | None = 50) -> list[dict[str, Any]]:
        """The newest `limit` jobs (None: all of them), over as many pages as that takes."""
        size = 200 if limit is None else max(1, min(limit, 200))
        return list(itertools.islice(self.iter_jobs(states, size), limit))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def delete(self, job_id: str) -> bool:
        """Delete the job, its artifact and checkpoints; True when gone at once, False when it was running (it is
        cancelled, then removed; it is 404 for the API already)."""
        return self._call("DELETE", f"/v1/jobs/{job_id}").status_code == 204

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job each time it changes (server-sent events), until it reaches a final state."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(30.0, read=120.0)) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise ApiError(resp.status_code, resp.text)
            event, data = "", []
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    if event == "job":
                        yield json.loads("\n".join(data))
                    event, data = "", []

    def wait(self, job_id: str, on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Follow the job's events until it is final (reconnecting if the stream drops); returns the job."""
        job = self.get(job_id)
        while job["state"] not in TERMINAL:
            try:
                for job in self.events(job_id):
                    if on_update is not None:
                        on_update(job)
            except (httpx.HTTPError, Pbs2pError):
                time.sleep(1.0)
            job = self.get(job_id)
        if on_update is not None:
            on_update(job)
        return job

    def download(self, job_id: str, dest: Path) -> list[dict[str, Any]]:
        """Every artifact file into `dest`, each checked against the manifest's sha256 (manifest last), then the
        whole artifact verified as `pbs2p_core` loads it."""
        listing = self._call("GET", f"/v1/jobs/{job_id}/artifact").json()
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MANIFEST_FILE).unlink(missing_ok=True)  # an older manifest must not vouch for new files
        for f in listing["files"]:
            self._fetch(f["url"], dest / f["name"], f["sha256"])
        self._fetch(listing["manifest_url"], dest / MANIFEST_FILE, None)
        verify_artifact(dest)
        return listing["files"]

    def _fetch(self, url: str, target: Path, sha256: str | None) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        with self.http.stream("GET", url, follow_redirects=True) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise ApiError(resp.status_code, f"{url}: {resp.text[:200]}")
            with open(tmp, "wb") as fh:
                for chunk in resp.iter_bytes(1 << 20):
                    digest.update(chunk)
                    fh.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            tmp.unlink()
            raise Pbs2pError(
                f"{target.name}: sha256 {digest.hexdigest()[:12]} does not match the manifest's {sha256[:12]}"
            )
        os.replace(tmp, target)
