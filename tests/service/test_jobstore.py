"""The job store (service/jobstore.py) against SQLite (a temporary file) and a real PostgreSQL (127.0.0.1:5432, a fresh
schema per test): hashed API keys, tenant isolation, pagination, idempotency, compare-and-set transitions, concurrent
claims and recovery of jobs whose dispatcher is gone."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import create_engine, select, text

from pbs2p.service import outbox
from pbs2p.service.jobrecords import (
    ACTIVE,
    ApiKeyRow,
    IdempotencyConflict,
    Job,
    JobState,
    QueueFull,
    decode_cursor,
    encode_cursor,
)
from pbs2p.service.jobstore import JobStore

PG_URL = os.environ.get("PBS2P_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CONFIG: dict[str, Any] = {"method": "pbs2p", "pattern": "6:8"}
T = TypeVar("T")


@pytest.fixture(scope="session")
def postgres() -> str:
    """The PostgreSQL URL, checked once: skipped loudly when unreachable, a failure under CI."""
    engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:  # any reason it cannot be reached
        msg = f"PostgreSQL NOT REACHABLE at {PG_URL} ({type(exc).__name__}: {exc}); PostgreSQL store tests NOT RUN"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    finally:
        engine.dispose()
    return PG_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
        yield s
        s.close()
        return
    base = request.getfixturevalue("postgres")
    schema = f"t_{secrets.token_hex(6)}"  # a fresh schema per test: isolated from other tests and other users
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    s = JobStore(f"{base}{sep}options=-csearch_path%3D{schema}")
    try:
        with s.session() as sess:  # the tables really are in the fresh schema
            assert sess.execute(text("select current_schema()")).scalar() == schema
        yield s
    finally:
        s.close()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def make_jobs(store: JobStore, tenant: str, n: int, **kw: Any) -> list[Job]:
    return [store.create_job(tenant, f"org/model-{i}", CONFIG, name=f"j{i}", **kw)[0] for i in range(n)]


def in_threads(n: int, fn: Callable[[int], T]) -> list[T]:
    """`fn(i)` for i < n, started together from n threads."""
    barrier = threading.Barrier(n)

    def run(i: int) -> T:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def state_of(store: JobStore, job_id: str) -> JobState:
    job = store.get(job_id)
    assert job is not None
    return job.state


# -- API keys -------------------------------------------------------------------------------------------------
def test_keys_are_stored_hashed_and_can_be_revoked(store: JobStore) -> None:
    key = store.create_key("acme")
    other = store.create_key("acme")
    assert key.startswith("pbs2p_") and key != other
    assert store.tenant_for_key(key) == "acme"
    with store.session() as s:
        rows = [(r.tenant, r.key_hash, r.prefix) for r in s.scalars(select(ApiKeyRow))]
    assert len(rows) == 2
    stored = " ".join(" ".join(r) for r in rows)
    assert key not in stored and other not in stored  # only hashes and a short prefix are kept
    assert hashlib.sha256(key.encode()).hexdigest() in {r[1] for r in rows}
    assert all(len(prefix) < len(key) // 2 for _, _, prefix in rows)

    assert store.revoke_key(key[:12]) == 1
    assert store.tenant_for_key(key) is None
    assert store.revoke_key(key[:12]) == 0  # already revoked
    assert store.tenant_for_key(other) == "acme"  # the other key still works
    assert store.tenant_for_key("pbs2p_not-a-key") is None
    assert store.tenant_for_key("") is None


# -- jobs: create, get, list ----------------------------------------------------------------------------------
def test_create_get_and_tenant_isolation(store: JobStore) -> None:
    job, created = store.create_job("a", "org/m", CONFIG, evaluate={"data": "wiki"}, name="first")
    assert created and job.state == JobState.QUEUED and job.tenant == "a" and job.attempts == 0
    assert job.config == CONFIG and job.evaluate == {"data": "wiki"} and job.name == "first"
    assert job.progress == {} and job.report == {} and job.artifact is None and job.owner is None

    assert store.get(job.id) == job
    assert store.get(job.id, tenant="a") == job
    assert store.get(job.id, tenant="b") is None  # another tenant's job looks like no job
    assert store.get("job_missing", tenant="a") is None
    make_jobs(store, "b", 2)
    assert [j.id for j in store.list_jobs("a")[0]] == [job.id]
    assert len(store.list_jobs("b")[0]) == 2
    assert store.list_jobs("c") == ([], None)


def test_list_newest_first_with_cursor_pages_without_gaps_or_repeats(store: JobStore) -> None:
    mine = make_jobs(store, "a", 7)
    make_jobs(store, "b", 3)  # interleaved tenants must not disturb the pages
    mine += make_jobs(store, "a", 3)
    expected = [j.id for j in reversed(mine)]

    seen: list[str] = []
    before: int | None = None
    pages = 0
    while True:
        page, before = store.list_jobs("a", limit=3, before=before)
        pages += 1
        assert len(page) == 3 or before is None
        seen += [j.id for j in page]
        if before is None:
            break
        assert decode_cursor(encode_cursor(before)) == before
    assert seen == expected and pages == 4
    page, nxt = store.list_jobs("a", limit=10)
    assert [j.id for j in page] == expected and nxt is None  # an exact fit has no next page


def test_list_filters_by_state(store: JobStore) -> None:
    jobs = make_jobs(store, "a", 4)
    assert store.transition(jobs[1].id, [JobState.QUEUED], JobState.CANCELLED)
    assert store.transition(jobs[2].id, [JobState.QUEUED], JobState.FAILED, error="boom")
    ids = lambda states: [j.id for j in store.list_jobs("a", states)[0]]  # noqa: E731
    assert ids([JobState.QUEUED]) == [jobs[3].id, jobs[0].id]
    assert ids([JobState.CANCELLED, JobState.FAILED]) == [jobs[2].id, jobs[1].id]
    assert ids([JobState.RUNNING]) == []
    assert len(ids([])) == 4
    page, before = store.list_jobs("a", [JobState.QUEUED], limit=1)
    assert [j.id for j in page] == [jobs[3].id] and before is not None
    assert [j.id for j in store.list_jobs("a", [JobState.QUEUED], limit=1, before=before)[0]] == [jobs[0].id]


def test_cursor_rejects_what_the_store_did_not_hand_out() -> None:
    assert decode_cursor(encode_cursor(42)) == 42
    sup = base64.urlsafe_b64encode("s\u00b2".encode()).decode()  # "s²": isdigit() but not an int
    for bad in ("", "abc", "!!!!", encode_cursor(1)[:-1] + "x", "eDEy", sup, encode_cursor(2**63)):
        with pytest.raises(ValueError):
            decode_cursor(bad)
    assert decode_cursor(encode_cursor(2**63 - 1)) == 2**63 - 1


# -- idempotency ----------------------------------------------------------------------------------------------
def test_idempotency_key_returns_the_same_job_or_conflicts(store: JobStore) -> None:
    job, created = store.create_job("a", "org/m", CONFIG, name="x", idempotency_key="k1")
    again, created_again = store.create_job("a", "org/m", CONFIG, name="x", idempotency_key="k1")
    assert created and not created_again and again.id == job.id
    with pytest.raises(IdempotencyConflict):
        store.create_job("a", "org/m", {**CONFIG, "pattern": "5:8"}, name="x", idempotency_key="k1")
    with pytest.raises(IdempotencyConflict):
        store.create_job("a", "org/other", CONFIG, name="x", idempotency_key="k1")
    # keys are per tenant; no key means a new job each time
    other, created_other = store.create_job("b", "org/m", CONFIG, name="x", idempotency_key="k1")
    assert created_other and other.id != job.id
    assert store.create_job("a", "org/m", CONFIG)[0].id != store.create_job("a", "org/m", CONFIG)[0].id
    assert len(store.list_jobs("a")[0]) == 3


def test_concurrent_creation_with_one_key_makes_one_job(store: JobStore) -> None:
    n = 8
    results = in_threads(n, lambda i: store.create_job("a", "org/m", CONFIG, idempotency_key="same"))
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(store.list_jobs("a")[0]) == 1


# -- compare-and-set ------------------------------------------------------------------------------------------
def test_transition_is_compare_and_set(store: JobStore) -> None:
    (job,) = make_jobs(store, "a", 1)
    assert not store.transition(job.id, [JobState.RUNNING], JobState.UPLOADING)  # wrong expected state
    assert not store.transition("job_missing", [JobState.QUEUED], JobState.RUNNING)
    assert state_of(store, job.id) == JobState.QUEUED

    claimed = store.claim("owner-1")
    assert claimed is not None and claimed.id == job.id and claimed.owner == "owner-1"
    assert not store.transition(job.id, [JobState.RUNNING], JobState.UPLOADING, owner="owner-2")  # not its owner
    assert state_of(store, job.id) == JobState.RUNNING
    assert store.transition(job.id, [JobState.RUNNING], JobState.UPLOADING, owner="owner-1", progress={"stage": "up"})
    assert store.transition(job.id, [JobState.UPLOADING], JobState.SUCCEEDED, owner="owner-1", artifact="a/x")
    done = store.get(job.id)
    assert done is not None and done.state == JobState.SUCCEEDED and done.artifact == "a/x"
    assert done.progress == {"stage": "up"} and done.finished_at is not None
    # a final state is final: a late cancel or a second dispatcher loses
    assert not store.transition(job.id, [JobState.QUEUED, JobState.RUNNING], JobState.CANCELLED)


def test_racing_transitions_have_one_winner(store: JobStore) -> None:
    (job,) = make_jobs(store, "a", 1)
    wins = in_threads(6, lambda i: store.transition(job.id, [JobState.QUEUED], JobState.CANCELLED, error=f"t{i}"))
    assert sum(wins) == 1
    assert state_of(store, job.id) == JobState.CANCELLED


def test_concurrent_claims_take_each_job_exactly_once(store: JobStore) -> None:
    jobs = make_jobs(store, "a", 12)

    def worker(i: int) -> list[str]:
        got = []
        while (job := store.claim(f"owner-{i}")) is not None:
            assert job.state == JobState.RUNNING and job.owner == f"owner-{i}" and job.attempts == 1
            got.append(job.id)
        return got

    claimed = [jid for got in in_threads(6, worker) for jid in got]
    assert sorted(claimed) == sorted(j.id for j in jobs)  # every job once, none twice
    assert store.counts()[JobState.RUNNING.value] == 12
    assert store.claim("late") is None


def test_claim_takes_the_oldest_queued_job(store: JobStore) -> None:
    jobs = make_jobs(store, "a", 3)
    assert store.transition(jobs[0].id, [JobState.QUEUED], JobState.CANCELLED)
    job = store.claim("o")
    assert job is not None and job.id == jobs[1].id and job.started_at is not None and job.heartbeat_at is not None


# -- heartbeats and recovery ----------------------------------------------------------------------------------
def test_heartbeat_refreshes_only_the_owners_active_jobs(store: JobStore) -> None:
    make_jobs(store, "a", 2)
    mine, theirs = store.claim("me"), store.claim("them")
    assert mine is not None and theirs is not None
    old = time.time() - 1000
    for job in (mine, theirs):
        assert store.transition(job.id, [JobState.RUNNING], JobState.RUNNING, heartbeat_at=old)
    before = time.time()
    store.heartbeat("me", [mine.id, theirs.id])
    store.heartbeat("me", [])
    fresh, stale = store.get(mine.id), store.get(theirs.id)
    assert fresh is not None and fresh.heartbeat_at is not None and fresh.heartbeat_at >= before
    assert stale is not None and stale.heartbeat_at == pytest.approx(old)
    assert sorted(store.owners()) == ["me", "them"]


def test_set_progress_reports_cancelling_and_lost_ownership(store: JobStore) -> None:
    make_jobs(store, "a", 1)
    job = store.claim("me")
    assert job is not None
    assert store.set_progress(job.id, "me", {"stage": "block", "block": 1, "blocks": 4}) == JobState.RUNNING
    assert store.set_progress(job.id, "other", {"stage": "x"}) is None
    assert store.transition(job.id, [JobState.RUNNING], JobState.CANCELLING)
    assert store.set_progress(job.id, "me", {"stage": "block", "block": 2, "blocks": 4}) == JobState.CANCELLING
    got = store.get(job.id)
    assert got is not None and got.progress == {"stage": "block", "block": 2, "blocks": 4}


def test_recover_requeues_stale_and_dead_owners_and_finishes_cancels(store: JobStore) -> None:
    jobs = make_jobs(store, "a", 5)
    stale, dead, alive, cancelling, queued = jobs
    for owner in ("o-stale", "o-dead", "o-alive", "o-cancel"):
        assert store.claim(owner) is not None
    old = time.time() - 120
    assert store.transition(stale.id, [JobState.RUNNING], JobState.UPLOADING, heartbeat_at=old)
    assert store.transition(cancelling.id, [JobState.RUNNING], JobState.CANCELLING, heartbeat_at=old)

    moved = store.recover(lease_seconds=60, dead_owners=["o-dead", "o-nobody"])
    assert sorted(moved) == sorted([stale.id, dead.id, cancelling.id])
    assert state_of(store, stale.id) == JobState.QUEUED
    assert state_of(store, dead.id) == JobState.QUEUED
    assert state_of(store, alive.id) == JobState.RUNNING  # fresh heartbeat, owner alive: untouched
    assert state_of(store, cancelling.id) == JobState.CANCELLED
    assert state_of(store, queued.id) == JobState.QUEUED
    requeued = store.get(stale.id)
    assert requeued is not None and requeued.progress == {"stage": "requeued"} and requeued.finished_at is None
    assert store.owners() == ["o-alive"]
    assert store.recover(lease_seconds=60) == []  # nothing left to recover

    # the requeued jobs are claimed again, oldest first, as a second attempt
    again = store.claim("o-new")
    assert again is not None and again.id == stale.id and again.attempts == 2 and again.owner == "o-new"
    assert again.started_at == requeued.started_at  # the first start is kept


def test_counts_has_every_state(store: JobStore) -> None:
    assert store.counts() == {s.value: 0 for s in JobState}
    jobs = make_jobs(store, "a", 3) + make_jobs(store, "b", 1)
    assert store.claim("o") is not None
    assert store.transition(jobs[1].id, [JobState.QUEUED], JobState.CANCELLED)
    counts = store.counts()
    assert counts["QUEUED"] == 2 and counts["RUNNING"] == 1 and counts["CANCELLED"] == 1
    assert sum(counts.values()) == 4 and set(counts) == {s.value for s in JobState}
    assert set(ACTIVE) <= set(JobState)


# -- fairness and quotas --------------------------------------------------------------------------------------
def finish(store: JobStore, job: Job | None) -> Job:
    assert job is not None
    assert store.transition(job.id, [JobState.RUNNING], JobState.SUCCEEDED, owner=job.owner)
    return job


def test_a_tenant_with_one_job_starts_before_another_tenants_fifty_queued(store: JobStore) -> None:
    flood = make_jobs(store, "a", 50)
    running = store.claim("d1")
    assert running is not None and running.id == flood[0].id
    (late,) = make_jobs(store, "b", 1)
    nxt = store.claim("d2")  # a second dispatcher slot: b has none running, a has one
    assert nxt is not None and nxt.id == late.id and nxt.tenant == "b"
    # one slot, nothing running: the least recently served tenant goes first (a before b; a newcomer before a)
    finish(store, running)
    finish(store, nxt)
    then = store.claim("d1")
    assert then is not None and then.tenant == "a"
    finish(store, then)
    (other,) = make_jobs(store, "c", 1)
    newcomer = store.claim("d1")
    assert newcomer is not None and newcomer.id == other.id


def test_claims_take_turns_over_tenants_and_priorities_within_one(store: JobStore) -> None:
    for tenant in ("a", "b", "c"):
        make_jobs(store, tenant, 3)
    (urgent,) = make_jobs(store, "a", 1, priority=5)
    order = []
    while (job := store.claim("o")) is not None:
        order.append((job.tenant, job.id))
        finish(store, job)  # one slot: each job ends before the next claim
    assert [t for t, _ in order] == ["a", "b", "c"] * 3 + ["a"]
    assert order[0][1] == urgent.id  # a's first turn goes to its highest priority job
    for tenant in ("a", "b", "c"):  # within a tenant, equal priorities run oldest first
        seqs = [store.get(jid).seq for t, jid in order if t == tenant and jid != urgent.id]  # type: ignore[union-attr]
        assert seqs == sorted(seqs)


def test_the_running_limit_skips_a_full_tenant_even_for_racing_dispatchers(store: JobStore) -> None:
    make_jobs(store, "a", 10)
    make_jobs(store, "b", 2)

    def dispatcher(i: int) -> list[str]:
        got = []
        while (job := store.claim(f"owner-{i}", max_running_per_tenant=2)) is not None:
            got.append(job.tenant)
        return got

    tenants = [t for got in in_threads(6, dispatcher) for t in got]
    assert sorted(tenants) == ["a", "a", "b", "b"]  # two each, however the six raced
    assert store.claim("late", max_running_per_tenant=2) is None  # a's eight wait for a slot
    running_a = store.list_jobs("a", [JobState.RUNNING])[0]
    finish(store, store.get(running_a[0].id))
    freed = store.claim("late", max_running_per_tenant=2)
    assert freed is not None and freed.tenant == "a"


def test_the_queue_limit_holds_under_concurrent_submits(store: JobStore) -> None:
    make_jobs(store, "a", 3, max_queued=5)

    def submit(i: int) -> bool:
        try:
            store.create_job("a", f"org/m{i}", CONFIG, max_queued=5)
            return True
        except QueueFull as exc:
            assert exc.limit == 5
            return False

    assert sum(in_threads(6, submit)) == 2
    assert store.counts()[JobState.QUEUED.value] == 5
    make_jobs(store, "b", 1, max_queued=5)  # another tenant's queue is its own
    assert store.claim("o") is not None  # one of a's starts: room for one more
    store.create_job("a", "org/next", CONFIG, max_queued=5)
    with pytest.raises(QueueFull):
        store.create_job("a", "org/over", CONFIG, max_queued=5)


# -- the webhook outbox ---------------------------------------------------------------------------------------
HOOK = "http://127.0.0.1:9/hook"


def events(store: JobStore, job_id: str) -> list[tuple[str, str]]:
    """(type, job state) of each delivery row the job's state changes wrote, oldest first."""
    out = []
    for row in store.outbox.deliveries(job_id):
        body = json.loads(row.body)
        assert body["id"] == row.event_id and body["job"]["id"] == job_id and row.url == HOOK
        out.append((body["type"], body["job"]["state"]))
    return out


def test_each_state_change_writes_its_webhook_delivery_in_the_same_transaction(store: JobStore) -> None:
    job, _ = store.create_job("acme", "org/m", CONFIG, webhook_url=HOOK, max_queued=1)
    plain, _ = store.create_job("beta", "org/m", CONFIG)
    with pytest.raises(QueueFull):  # the refused insert takes its QUEUED event with it
        store.create_job("acme", "org/m", CONFIG, webhook_url=HOOK, max_queued=1)
    assert store.claim("d1") is not None and store.claim("d1") is not None  # both jobs: RUNNING
    assert not store.transition(job.id, [JobState.QUEUED], JobState.CANCELLED)  # a lost compare-and-set: no event
    assert store.transition(job.id, [JobState.RUNNING], JobState.CANCELLING, owner="d1")
    assert sorted(store.recover(60.0, dead_owners=["d1"])) == sorted([job.id, plain.id])  # CANCELLED; QUEUED
    assert store.mark_deleted(job.id, [JobState.CANCELLED], JobState.CANCELLED)
    assert events(store, job.id) == [
        ("job.state_changed", "QUEUED"),
        ("job.state_changed", "RUNNING"),
        ("job.state_changed", "CANCELLING"),
        ("job.state_changed", "CANCELLED"),
        ("job.deleted", "CANCELLED"),
    ]
    assert store.outbox.deliveries(plain.id) == []  # no webhook, no row
    assert len(store.outbox.deliveries()) == 5
    assert store.remove(job.id) and len(events(store, job.id)) == 5  # the events outlive the job's row


def test_concurrent_claims_take_each_delivery_once(store: JobStore) -> None:
    make_jobs(store, "acme", 30, webhook_url=HOOK)
    other = JobStore(store.url)  # a second worker process's store on the same database
    try:
        stores = [store, other]

        def claim_all(i: int) -> list[int]:
            got = []
            while (d := stores[i % 2].outbox.claim(f"w{i}", max_attempts=3)) is not None:
                got.append(d.seq)
            return got

        claimed = in_threads(6, claim_all)
    finally:
        other.close()
    seqs = [seq for got in claimed for seq in got]
    assert sorted(seqs) == [row.seq for row in store.outbox.deliveries()] and len(seqs) == 30  # each once
    by_seq = {seq: f"w{i}" for i, got in enumerate(claimed) for seq in got}
    assert all(r.attempts == 1 and r.claimed_by == by_seq[r.seq] for r in store.outbox.deliveries())


def test_a_claim_is_leased_answers_back_off_and_the_attempts_are_bounded(store: JobStore) -> None:
    job, _ = store.create_job("acme", "org/m", CONFIG, webhook_url=HOOK)
    t0 = time.time()
    first = store.outbox.claim("w1", max_attempts=3)
    assert first is not None and first.attempt == 1 and json.loads(first.body)["job"]["id"] == job.id
    assert store.outbox.claim("w2", max_attempts=3) is None  # held by w1's lease
    assert store.outbox.claim("w2", max_attempts=3, now=t0 + outbox.LEASE_S - 1) is None
    again = store.outbox.claim("w2", max_attempts=3, now=t0 + outbox.LEASE_S + 1)  # w1 died: its lease ran out
    assert again is not None and again.seq == first.seq and again.attempt == 2
    assert store.outbox.record(first, "w1", None, max_attempts=3) == "lost"  # w1's late answer is not taken
    assert store.outbox.record(again, "w2", "HTTP 503", max_attempts=3) == "retry"
    (row,) = store.outbox.deliveries(job.id)
    assert row.last_error == "HTTP 503" and row.delivered_at is None and row.due_at is not None
    assert 2.0 - 0.5 <= row.due_at - time.time() <= 2.0  # backoff after attempt 2: 2 s
    assert store.outbox.claim("w2", max_attempts=3) is None
    third = store.outbox.claim("w2", max_attempts=3, now=row.due_at)
    assert third is not None and third.attempt == 3
    assert store.outbox.record(third, "w2", "ConnectError: refused", max_attempts=3) == "given_up"
    (row,) = store.outbox.deliveries(job.id)
    assert row.attempts == 3 and row.given_up_at is not None and row.due_at is None
    assert row.last_error == "ConnectError: refused" and row.claimed_by == "w2"
    assert store.outbox.claim("w3", max_attempts=3, now=time.time() + 3600) is None  # done for good

    done, _ = store.create_job("acme", "org/m", CONFIG, webhook_url=HOOK)
    d = store.outbox.claim("w1", max_attempts=3)
    assert d is not None and store.outbox.record(d, "w1", None, max_attempts=3) == "delivered"
    (row,) = store.outbox.deliveries(done.id)
    assert row.delivered_at is not None and row.due_at is None and row.attempts == 1
    assert store.outbox.prune(time.time() - 60) == 0 and store.outbox.prune(time.time() + 1) == 2  # both finished


def test_a_last_attempt_whose_worker_died_is_given_up_once_its_lease_ran_out(store: JobStore) -> None:
    job, _ = store.create_job("acme", "org/m", CONFIG, webhook_url=HOOK)
    d = store.outbox.claim("w1", max_attempts=1)
    assert d is not None  # ... and w1 is killed before the answer
    assert store.outbox.claim("w2", max_attempts=1, now=time.time() + outbox.LEASE_S + 1) is None
    (row,) = store.outbox.deliveries(job.id)
    assert row.given_up_at is not None and row.due_at is None and row.attempts == 1
    assert row.last_error == "attempt 1 got no recorded answer (its worker stopped)"
