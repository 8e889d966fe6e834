"""The hot routes' JSON memoized by row (service/api/bodies.py): the same bytes the models render, and a new body
for a row that changed in any column (also one that leaves `updated_at` alone)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pbs2p.service.api.bodies import JobBodies
from pbs2p.service.api.schemas import JobList, JobPublic, JobSummary
from pbs2p.service.jobrecords import JobState, encode_cursor
from pbs2p.service.jobstore import JobStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield s
    s.close()


def rendered(store: JobStore, job_id: str) -> bytes:
    job = store.get(job_id, "acme")
    assert job is not None
    return JobPublic.of(job).model_dump_json().encode()


def test_a_job_body_is_the_models_json_and_follows_every_change(store: JobStore) -> None:
    bodies = JobBodies()
    job, _ = store.create_job("acme", "/models/tiny", {"pattern": "6:8", "seed": 0}, None, "first")
    row = store.get_row(job.id, "acme")
    assert row is not None
    first = bodies.job(row)[0]
    assert first == rendered(store, job.id) and json.loads(first)["state"] == "QUEUED"
    assert bodies.job(store.get_row(job.id, "acme") or ())[0] is first  # the same row: rendered once

    assert store.claim("me") is not None
    store.set_progress(job.id, "me", {"stage": "compress", "block": 3, "blocks": 8})
    running = bodies.job(store.get_row(job.id, "acme") or ())[0]
    assert running == rendered(store, job.id) and json.loads(running)["progress"]["block"] == 3
    for st in (JobState.UPLOADING, JobState.SUCCEEDED):
        assert store.transition(job.id, [JobState.RUNNING, JobState.UPLOADING], st, owner="me", report={
            "metrics": {"true_bits": 1.1}, "timings": {"compress_s": 2.0}, "blocks": [{"index": 0, "n_keep": 6}],
        })  # fmt: skip
    done = json.loads(bodies.job(store.get_row(job.id, "acme") or ())[0])
    assert (done["state"], done["metrics"], done["report"]) == ("SUCCEEDED", {"true_bits": 1.1}, {"blocks": [
        {"index": 0, "n_keep": 6}
    ]})  # fmt: skip
    # retention keeps updated_at: the body still changes, as the row did
    assert store.mark_artifact_expired(job.id)
    expired = bodies.job(store.get_row(job.id, "acme") or ())[0]
    assert expired == rendered(store, job.id) and json.loads(expired)["artifact_expired_at"] is not None
    assert store.get_row(job.id, "intruder") is None  # another tenant's job: no row, as store.get gives no job


@pytest.mark.parametrize("more", [False, True])
def test_a_page_is_the_job_lists_json(store: JobStore, more: bool) -> None:
    bodies = JobBodies()
    for i in range(4):
        store.create_job("acme", "/models/tiny", {"pattern": "6:8", "seed": i}, {"data": "wiki"}, f"job-{i}")
    limit = 3 if more else 10
    rows, last = store.list_rows("acme", (), limit)
    jobs, last_seq = store.list_jobs("acme", (), limit)
    assert last == last_seq and (last is not None) == more
    cursor = encode_cursor(last) if last else None
    want = JobList.model_construct(jobs=[JobSummary.of(j) for j in jobs], next_cursor=cursor).model_dump_json()
    assert bodies.page(rows, cursor) == want.encode()
    assert bodies.page(rows, cursor) == want.encode()  # memoized rows, the same bytes


def test_the_memo_stays_within_its_bound(store: JobStore) -> None:
    bodies = JobBodies(max_bytes=20_000)
    ids = [store.create_job("acme", "/models/tiny", {"pattern": "6:8", "seed": i})[0].id for i in range(40)]
    for job_id in ids:
        row = store.get_row(job_id, "acme")
        assert row is not None and bodies.job(row)[0] == rendered(store, job_id)
    assert 0 < len(bodies._full) < len(ids)  # it started again once past 20 kB
