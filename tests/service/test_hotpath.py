"""The polling GETs' shortcut (service/api/hotpath.py): the same answers as the routes, and the routes' own answer
for everything it leaves to them (an unknown or revoked key, a missing or another tenant's job, an odd query)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from pbs2p.service.api.routes import jobs as job_routes
from pbs2p.service.jobrecords import JobState
from pbs2p.testing.servers import Service, running_service

SAME = ("content-type", "content-length", "etag")  # what both answers must share besides status and body


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    data = tmp_path_factory.mktemp("hot")
    with running_service(data, data) as service:
        yield service


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The reads the routes made (their run_in_threadpool spied on, not replaced): "job" for GET one job's, "list"
    for the list's."""
    seen: list[str] = []
    real = job_routes.run_in_threadpool
    names = {"find_row": "job", "list_rows": "list"}

    async def spied(fn: Callable[..., Any], *args: Any) -> Any:
        seen.append(names.get(fn.__name__, fn.__name__))
        return await real(fn, *args)

    monkeypatch.setattr(job_routes, "run_in_threadpool", spied)
    return seen


def answer(resp: httpx.Response) -> tuple[Any, ...]:
    return resp.status_code, resp.content, *(resp.headers.get(h) for h in SAME)


def test_the_shortcut_answers_as_the_routes(svc: Service, routed: list[str]) -> None:
    auth = svc.key("hot")
    for i in range(3):
        svc.store.create_job("hot", "/models/tiny", {"pattern": "6:8", "seed": i}, None, f"job-{i}")
    job, _ = svc.store.create_job("hot", "/models/tiny", {"pattern": "6:8"}, None, "polled")
    with httpx.Client(base_url=svc.url, headers=auth) as client:
        first = client.get(f"/v1/jobs/{job.id}")  # a key not seen yet: the route checks it
        assert routed == ["job"] and first.status_code == 200 and json.loads(first.content)["name"] == "polled"
        again = client.get(f"/v1/jobs/{job.id}")
        assert routed == ["job"] and answer(again) == answer(first)  # the shortcut, the same answer
        assert client.get(f"/v1/jobs/{job.id}", headers={"If-None-Match": first.headers["etag"]}).status_code == 304

        listed = client.get("/v1/jobs?limit=2")  # learns the list route (first GET of it), then the shortcut
        assert client.get("/v1/jobs?limit=2").content == listed.content and routed == ["job", "list"]
        for query in ("?limit=2", "", "?limit=200"):
            hot = client.get(f"/v1/jobs{query}")
            via_route = client.get(f"/v1/jobs{query}{'&' if query else '?'}cursor=")  # an empty cursor: the route
            assert answer(hot) == answer(via_route), query
        assert routed == ["job", "list", "list", "list", "list"]  # the first list, and each with a cursor
        assert json.loads(listed.content)["next_cursor"] is not None  # a page with a next one: the cursor agrees

        svc.store.transition(job.id, [JobState.QUEUED], JobState.CANCELLED)
        changed = client.get(f"/v1/jobs/{job.id}", headers={"If-None-Match": first.headers["etag"]})
        assert changed.status_code == 200 and changed.json()["state"] == "CANCELLED"


def test_what_it_leaves_to_the_routes(svc: Service, routed: list[str]) -> None:
    auth = svc.key("cold")
    job, _ = svc.store.create_job("cold", "/models/tiny", {"pattern": "6:8"})
    other, _ = svc.store.create_job("someone", "/models/tiny", {"pattern": "6:8"})
    with httpx.Client(base_url=svc.url, headers=auth) as client:
        assert client.get(f"/v1/jobs/{job.id}").status_code == 200 and client.get("/v1/jobs").status_code == 200
        routed.clear()
        cases = [
            (f"/v1/jobs/{other.id}", {}, 404),  # another tenant's job: the route's 404, as for no job
            ("/v1/jobs/job_missing", {}, 404),
            ("/v1/jobs/bad%20id", {}, 422),
            (f"/v1/jobs/{'x' * 41}", {}, 422),
            ("/v1/jobs?limit=0", {}, 422),
            ("/v1/jobs?limit=201", {}, 422),
            ("/v1/jobs?limit=2x", {}, 422),
            ("/v1/jobs?state=QUEUED", {}, 200),
            (f"/v1/jobs/{job.id}", {"Authorization": "Bearer pbs2p_unknown"}, 401),
            (f"/v1/jobs/{job.id}", {"Authorization": "Basic dXNlcjpwYXNz"}, 401),
            ("/v1/jobs", {"Authorization": "Bearer"}, 401),
        ]
        for path, headers, status in cases:
            resp = client.get(path, headers=headers)
            assert resp.status_code == status, (path, headers, resp.text)
            if status != 200:
                assert resp.headers["content-type"] == "application/problem+json"
        assert routed.count("job") == 2 and routed.count("list") == 1  # the 404s and the filtered list


def test_its_requests_are_counted_and_logged_as_the_routes(svc: Service, caplog: pytest.LogCaptureFixture) -> None:
    auth = svc.key("counted")
    job, _ = svc.store.create_job("counted", "/models/tiny", {"pattern": "6:8"})
    with httpx.Client(base_url=svc.url, headers=auth) as client:

        def count() -> float:
            for line in client.get("/metrics").text.splitlines():
                if line.startswith('pbs2p_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"}'):
                    return float(line.rsplit(" ", 1)[1])
            return 0.0

        client.get(f"/v1/jobs/{job.id}")
        before = count()
        with caplog.at_level("INFO", logger="pbs2p.access"):
            resp = client.get(f"/v1/jobs/{job.id}")
        assert count() == before + 1
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pbs2p.access"]
    assert (line["tenant"], line["route"], line["status"], line["request_id"]) == (
        "counted", "/v1/jobs/{job_id}", 200, resp.headers["x-request-id"],
    )  # fmt: skip
