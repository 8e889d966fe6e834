"""Schema migrations of the job store (service/migrations), each on SQLite (a temporary file) and on the PostgreSQL of
127.0.0.1:5432 (a fresh schema per database): a store made before migrations existed is stamped 0001 and upgraded with
every row kept, configs rewritten to version 2 and back, an empty database gets the head, concurrent opens migrate
once, a database from a newer pbs2p is refused with what to do."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    insert,
    inspect,
    text,
)

from pbs2p.core.errors import Pbs2pError
from pbs2p.service import migrations
from pbs2p.service.cli import main
from pbs2p.service.jobrecords import Base, JobState
from pbs2p.service.jobstore import JobStore

PG_URL = os.environ.get("PBS2P_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
HEAD = "0004"
NEW_IN_0003 = {"priority": 0, "claimed_at": None, "webhook_url": None, "artifact_expired_at": None, "deleted_at": None}
ABLATIONS = {
    "spbo_mode", "cfs_score", "cfs_spread", "cfs_samples", "mask_score", "arb_iters", "arb_variant", "salient_search",
    "salient_allocation", "column_feedback", "scale_refit", "spbo_report", "scale_dtype", "true_sequential",
}  # fmt: skip

# A version 1 config with every field (CompressionConfig.to_dict() before version 2, some values off their defaults)
FULL_V1: dict[str, Any] = {
    "method": "pbs2p", "pattern": "5:8", "spbo_steps": 2, "spbo_mode": "fixed", "allocation": "cfs",
    "cfs_score": "error", "cfs_spread": 2, "cfs_samples": 8, "mask_score": "wanda", "block_size": 64,
    "damping": 0.02, "arb_iters": 20, "arb_variant": "arb-x", "salient_columns": 8, "salient_search": [4, 8],
    "salient_allocation": "block", "column_feedback": True, "scale_refit": False, "spbo_report": True,
    "scale_dtype": "bf16", "scale_layout": "shared", "skip_modules": ["*.down_proj"], "propagation": "independent",
    "true_sequential": True, "calib": "wiki", "calib_samples": 32, "seqlen": 256, "seed": 3, "batch_size": 4,
    "device": "cpu", "version": 1,
}  # fmt: skip
# ... and what version 2 makes of it, written out
FULL_V2: dict[str, Any] = {
    "method": "pbs2p", "pattern": "5:8", "spbo_steps": 2, "allocation": "cfs", "block_size": 64, "damping": 0.02,
    "salient_columns": 8, "scale_layout": "shared", "skip_modules": ["*.down_proj"], "propagation": "independent",
    "calib": "wiki", "calib_samples": 32, "seqlen": 256, "seed": 3, "batch_size": 4, "device": "cpu",
    "ablations": {
        "spbo_mode": "fixed", "cfs_score": "error", "cfs_spread": 2, "cfs_samples": 8, "mask_score": "wanda",
        "arb_iters": 20, "arb_variant": "arb-x", "salient_search": [4, 8], "salient_allocation": "block",
        "column_feedback": True, "scale_refit": False, "spbo_report": True, "scale_dtype": "bf16",
        "true_sequential": True,
    },
    "version": 2,
}  # fmt: skip
SOME_V1 = {"method": "arb", "pattern": "6:8", "arb_iters": 30, "seed": 1, "device": "cpu", "version": 1}
SOME_V2 = {"method": "arb", "pattern": "6:8", "seed": 1, "device": "cpu", "ablations": {"arb_iters": 30}, "version": 2}
NO_VERSION = {"method": "pbs2p", "pattern": "6:8"}  # a v1 config needs no "version" (1 was the default)
ALREADY_V2 = {"method": "pbs2p", "pattern": "6:8", "ablations": {"spbo_mode": "fixed"}, "version": 2}


def legacy_tables() -> MetaData:
    """The job store's tables exactly as service/jobstore.py declared them before migrations (`Base.metadata`, made
    with create_all), frozen here: the migrations must take over a database that code made."""
    md = MetaData()
    Table(
        "api_keys",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("tenant", String(64), nullable=False, index=True),
        Column("key_hash", String(64), nullable=False, unique=True),
        Column("prefix", String(16), nullable=False),
        Column("created_at", Float, nullable=False),
        Column("revoked_at", Float, nullable=True),
    )
    Table(
        "jobs",
        md,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("id", String(40), nullable=False, unique=True),
        Column("tenant", String(64), nullable=False),
        Column("name", String(200), nullable=True),
        Column("state", String(16), nullable=False),
        Column("model", Text, nullable=False),
        Column("config", Text, nullable=False),
        Column("evaluate", Text, nullable=True),
        Column("idempotency_key", String(200), nullable=True),
        Column("request_hash", String(64), nullable=True),
        Column("created_at", Float, nullable=False),
        Column("updated_at", Float, nullable=False),
        Column("started_at", Float, nullable=True),
        Column("finished_at", Float, nullable=True),
        Column("attempts", Integer, nullable=False),
        Column("owner", String(200), nullable=True),
        Column("heartbeat_at", Float, nullable=True),
        Column("progress", Text, nullable=True),
        Column("report", Text, nullable=True),
        Column("error", Text, nullable=True),
        Column("artifact", Text, nullable=True),
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_tenant_seq", "tenant", "seq"),
        Index("ix_jobs_state_seq", "state", "seq"),
    )
    return md


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def request_hash(model: str, config: Any, evaluate: Any, name: str | None) -> str:
    """The store's hash of a create request (JobStore.create_job)."""
    return hashlib.sha256(dumps([model, config, evaluate, name]).encode()).hexdigest()


# -- databases ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres() -> str:
    """The PostgreSQL URL, checked once: skipped loudly when unreachable, a failure under CI."""
    engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:  # any reason it cannot be reached
        msg = f"PostgreSQL NOT REACHABLE at {PG_URL} ({type(exc).__name__}: {exc}); PostgreSQL migration tests NOT RUN"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    finally:
        engine.dispose()
    return PG_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def new_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """A factory of URLs of empty databases: SQLite files, or fresh PostgreSQL schemas (isolated from other tests
    and other users of the server; dropped after the test)."""
    made: list[str] = []
    base = request.getfixturevalue("postgres") if request.param == "postgresql" else ""
    admin = create_engine(base) if base else None

    def new() -> str:
        if admin is None:  # a new file each call (two calls in one test are two databases)
            return f"sqlite:///{tmp_path / f'jobs-{secrets.token_hex(4)}.db'}"
        schema = f"t_{secrets.token_hex(6)}"
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        made.append(schema)
        sep = "&" if "?" in base else "?"
        return f"{base}{sep}options=-csearch_path%3D{schema}"

    try:
        yield new
    finally:
        if admin is not None:
            with admin.begin() as conn:
                for schema in made:
                    conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


@pytest.fixture
def db_url(new_db: Callable[[], str]) -> str:
    return new_db()


def engine_of(url: str) -> Engine:
    return create_engine(url)


def rows(engine: Engine, table: str, order: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY {order}"))]


def version_of(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(text("SELECT version_num FROM alembic_version")))


def schema_of(engine: Engine) -> dict[str, Any]:
    """Tables, columns (type, nullability), primary keys, unique constraints and indexes, as the database says."""
    insp = inspect(engine)
    out: dict[str, Any] = {}
    for t in sorted(set(insp.get_table_names()) - {"alembic_version"}):
        out[t] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"], c.get("default")) for c in insp.get_columns(t)],
            "pk": insp.get_pk_constraint(t)["constrained_columns"],
            "unique": sorted((u["name"] or "", tuple(u["column_names"])) for u in insp.get_unique_constraints(t)),
            "indexes": sorted((i["name"] or "", tuple(i["column_names"]), i["unique"]) for i in insp.get_indexes(t)),
        }
    return out


KEYS = {"alive": "pbs2p_alive-key", "revoked": "pbs2p_revoked-key", "other": "pbs2p_other-tenant-key"}


def fill_legacy(engine: Engine) -> None:
    """What today's code leaves in a store: keys (one revoked), jobs in several states with several configs."""
    md = legacy_tables()
    md.create_all(engine)
    keys, jobs = md.tables["api_keys"], md.tables["jobs"]
    t = 1_700_000_000.25
    with engine.begin() as conn:
        for i, (label, tenant) in enumerate((("alive", "acme"), ("revoked", "acme"), ("other", "beta"))):
            key = KEYS[label]
            conn.execute(
                insert(keys).values(
                    tenant=tenant,
                    key_hash=hashlib.sha256(key.encode()).hexdigest(),
                    prefix=key[:12],
                    created_at=t + i,
                    revoked_at=t + 10 if label == "revoked" else None,
                )
            )
        base = {"progress": None, "report": None, "error": None, "artifact": None, "owner": None, "heartbeat_at": None}
        for i, (state, cfg, extra) in enumerate(
            (
                ("SUCCEEDED", FULL_V1, {"artifact": "acme/job_full", "report": dumps({"metrics": {"ppl": 441.5}}),
                                        "progress": dumps({"stage": "done"}), "finished_at": t + 99}),
                ("RUNNING", SOME_V1, {"owner": "dispatcher-1", "heartbeat_at": t + 50, "idempotency_key": "k-some",
                                      "progress": dumps({"stage": "compress", "block": 3, "blocks": 30})}),
                ("QUEUED", NO_VERSION, {"idempotency_key": "k-nover", "name": None}),
                ("FAILED", ALREADY_V2, {"error": "boom", "finished_at": t + 7}),
                ("CANCELLED", SOME_V1, {"finished_at": t + 8}),
            )
        ):  # fmt: skip
            model, name = f"org/model-{i}", extra.pop("name", f"job {i}")
            evaluate = {"data": "wiki", "seqlen": 128, "windows": 4} if i % 2 == 0 else None
            conn.execute(
                insert(jobs).values(
                    id=f"job_{i:024x}",
                    tenant="acme" if i < 4 else "beta",
                    name=name,
                    state=state,
                    model=model,
                    config=dumps(cfg),
                    evaluate=dumps(evaluate) if evaluate is not None else None,
                    request_hash=request_hash(model, cfg, evaluate, name),
                    created_at=t + i,
                    updated_at=t + i + 0.5,
                    started_at=t + i + 0.25 if state != "QUEUED" else None,
                    attempts=0 if state == "QUEUED" else 1,
                    **{"idempotency_key": None, "finished_at": None, **base, **extra},
                )
            )


# -- the schema -----------------------------------------------------------------------------------------------
def upgrade_to(engine: Engine, revision: str, legacy: bool = False) -> None:
    """Upgrade to `revision` (not the head); `legacy`: the tables were made before migrations (stamped 0001 first)."""
    with migrations.migration_transaction(engine) as conn:
        cfg = migrations.alembic_config(conn)
        if legacy:
            command.stamp(cfg, "0001")
        command.upgrade(cfg, revision)


def test_migrations_make_the_schema_create_all_made_and_the_models_declare(new_db: Callable[[], str]) -> None:
    legacy, migrated = engine_of(new_db()), engine_of(new_db())
    try:
        legacy_tables().create_all(legacy)
        upgrade_to(migrated, "0002")  # 0001 and 0002 (data only) make what create_all made
        assert schema_of(migrated) == schema_of(legacy)
        assert set(schema_of(migrated)) == {"api_keys", "jobs"}
        if migrated.dialect.name == "sqlite":  # the very CREATE statements
            q = text("SELECT type, name, sql FROM sqlite_master WHERE tbl_name != 'alembic_version' ORDER BY name")
            with legacy.connect() as a, migrated.connect() as b:
                assert a.execute(q).all() == b.execute(q).all()
        migrations.upgrade(migrated)
        columns = {c["name"]: c for c in inspect(migrated).get_columns("jobs")}
        assert set(NEW_IN_0003) <= set(columns) and not columns["priority"]["nullable"]
        assert any(i["name"] == "ix_jobs_tenant_claimed" for i in inspect(migrated).get_indexes("jobs"))
        with migrated.connect() as conn:  # the models are what the head makes: a model change needs a revision
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        legacy.dispose()
        migrated.dispose()


# -- (a) a store made before migrations -----------------------------------------------------------------------
def test_a_store_made_before_migrations_is_stamped_and_upgraded_with_every_row_kept(db_url: str) -> None:
    engine = engine_of(db_url)
    fill_legacy(engine)
    keys_before, jobs_before = rows(engine, "api_keys", "id"), rows(engine, "jobs", "seq")
    assert migrations.current(engine).describe().startswith("0001 without alembic_version")

    store = JobStore(db_url)
    try:
        assert version_of(engine) == [HEAD]
        assert rows(engine, "api_keys", "id") == keys_before
        jobs_after = rows(engine, "jobs", "seq")
        assert [j["seq"] for j in jobs_after] == [j["seq"] for j in jobs_before]
        expected = [FULL_V2, SOME_V2, {**NO_VERSION, "ablations": {}, "version": 2}, ALREADY_V2, SOME_V2]
        for before, after, cfg in zip(jobs_before, jobs_after, expected, strict=True):
            assert json.loads(after["config"]) == cfg
            assert after["config"] == dumps(cfg)  # the store's JSON convention
            if cfg is ALREADY_V2:
                assert after["config"] == before["config"] and after["request_hash"] == before["request_hash"]
            else:  # the hash follows the config, so that a replay after the upgrade is still a replay
                ev = json.loads(before["evaluate"]) if before["evaluate"] else None
                assert after["request_hash"] == request_hash(before["model"], cfg, ev, before["name"])
            unchanged = {k: v for k, v in after.items() if k not in ("config", "request_hash", *NEW_IN_0003)}
            assert unchanged == {k: v for k, v in before.items() if k not in ("config", "request_hash")}
            assert {k: after[k] for k in NEW_IN_0003} == NEW_IN_0003  # 0003's columns, as for a new job
        assert not ABLATIONS & set(json.loads(jobs_after[0]["config"]))

        # the store reads them, keys still authenticate, an old Idempotency-Key still replays
        assert store.tenant_for_key(KEYS["alive"]) == "acme" and store.tenant_for_key(KEYS["other"]) == "beta"
        assert store.tenant_for_key(KEYS["revoked"]) is None
        running = store.get(jobs_before[1]["id"])
        assert running is not None and running.state == JobState.RUNNING and running.config == SOME_V2
        assert running.owner == "dispatcher-1" and running.progress["block"] == 3
        replay, created = store.create_job("acme", "org/model-1", SOME_V2, None, "job 1", idempotency_key="k-some")
        assert not created and replay.id == jobs_before[1]["id"]
        new, created = store.create_job("acme", "org/new", {"method": "pbs2p"})
        assert created and new.seq > jobs_after[-1]["seq"]
        claimed = store.claim("o")
        assert claimed is not None and claimed.id == jobs_before[2]["id"]  # the old queued job comes first
    finally:
        store.close()

    again = JobStore(db_url)  # up to date: left as it is
    try:
        assert version_of(engine) == [HEAD] and len(rows(engine, "jobs", "seq")) == len(jobs_before) + 1
    finally:
        again.close()
        engine.dispose()


# -- (b) an empty database ------------------------------------------------------------------------------------
def test_b_an_empty_database_gets_the_head_and_the_store_works(db_url: str) -> None:
    engine = engine_of(db_url)
    assert migrations.current(engine).describe().startswith("empty")
    store = JobStore(db_url)
    try:
        assert version_of(engine) == [HEAD]
        assert migrations.current(engine).describe() == f"{HEAD} (head)"
        key = store.create_key("acme")
        assert store.tenant_for_key(key) == "acme"
        job, created = store.create_job("acme", "org/m", FULL_V1, idempotency_key="k")
        assert created and job.config == FULL_V1  # the store writes configs as given (no conversion at create time)
        claimed = store.claim("o")
        assert claimed is not None and claimed.id == job.id and claimed.state == JobState.RUNNING
    finally:
        store.close()
        engine.dispose()


# -- (c) downgrade --------------------------------------------------------------------------------------------
def test_c_downgrade_to_0001_restores_the_flat_configs(db_url: str) -> None:
    engine = engine_of(db_url)
    fill_legacy(engine)
    before = rows(engine, "jobs", "seq")
    JobStore(db_url).close()
    migrations.downgrade(engine, "0001")
    try:
        assert version_of(engine) == ["0001"]
        after = rows(engine, "jobs", "seq")
        for old, new in zip(before, after, strict=True):
            cfg = json.loads(old["config"])
            if cfg == NO_VERSION:  # the version it had implicitly is now written
                assert json.loads(new["config"]) == {**NO_VERSION, "version": 1}
                ev = json.loads(old["evaluate"]) if old["evaluate"] else None
                assert new["request_hash"] == request_hash(old["model"], {**NO_VERSION, "version": 1}, ev, old["name"])
                continue
            if cfg == ALREADY_V2:  # was version 2 before the upgrade: downgraded too
                assert json.loads(new["config"]) == {"method": "pbs2p", "pattern": "6:8", "spbo_mode": "fixed",
                                                     "version": 1}  # fmt: skip
                continue
            assert new == old  # byte for byte: config and request_hash as they were
        migrations.upgrade(engine)  # and up again
        assert version_of(engine) == [HEAD]
        assert json.loads(rows(engine, "jobs", "seq")[0]["config"]) == FULL_V2
    finally:
        engine.dispose()


def test_config_conversions_are_inverse() -> None:
    script = ScriptDirectory.from_config(migrations.alembic_config())
    module = script.get_revision("0002").module  # type: ignore[union-attr]
    assert module.config_v1_to_v2(FULL_V1) == FULL_V2
    assert module.config_v2_to_v1(FULL_V2) == FULL_V1
    assert module.config_v1_to_v2(SOME_V1) == SOME_V2 and module.config_v2_to_v1(SOME_V2) == SOME_V1
    assert set(module.ABLATIONS) == ABLATIONS and len(module.ABLATIONS) == 14
    assert module.config_v1_to_v2(ALREADY_V2) is None and module.config_v2_to_v1(FULL_V1) is None


# -- (d) concurrent opens -------------------------------------------------------------------------------------
OPEN_TOGETHER = """
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
from pbs2p.service.jobstore import JobStore
url, gate, i, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
(gate / f"ready{i}").touch()  # every process imported everything; they open the store at the same moment
while len(list(gate.glob("ready*"))) < n:
    time.sleep(0.002)
JobStore(url).close()
print("opened")
"""


def test_d_processes_opening_one_database_together_migrate_it_once(db_url: str, tmp_path: Path) -> None:
    n = 3
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_TOGETHER, db_url, str(gate), str(i), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(n)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, outs
    assert all(out.rstrip().endswith("opened") for out in outs), outs
    log = "".join(outs)
    assert log.count("Running upgrade  -> 0001") == 1 and log.count("Running upgrade 0001 -> 0002") == 1, outs
    assert log.count("Running upgrade 0002 -> 0003") == 1 and log.count("Running upgrade 0003 -> 0004") == 1, outs
    engine = engine_of(db_url)
    try:
        assert version_of(engine) == [HEAD]
    finally:
        engine.dispose()


def test_d_threads_opening_one_database_together(db_url: str) -> None:
    barrier = threading.Barrier(4)
    stores: list[JobStore] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        barrier.wait()
        try:
            stores.append(JobStore(db_url))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert errors == [] and len(stores) == 4
    engine = engine_of(db_url)
    try:
        assert version_of(engine) == [HEAD]
    finally:
        engine.dispose()


# -- (e) a database newer than this code ----------------------------------------------------------------------
def test_e_an_unknown_revision_is_refused_with_what_to_do(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    JobStore(db_url).close()
    engine = engine_of(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    try:
        newer = rf"revision '0099'.*does not know.*newer pbs2p.*pbs2p db downgrade {HEAD}"
        with pytest.raises(Pbs2pError, match=newer):
            JobStore(db_url)
        with pytest.raises(Pbs2pError, match="0099"):
            migrations.current(engine)
        assert version_of(engine) == ["0099"]  # untouched
    finally:
        engine.dispose()


# -- the command line -----------------------------------------------------------------------------------------
def test_cli_db_upgrade_current_and_downgrade(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = engine_of(db_url)
    fill_legacy(engine)
    monkeypatch.setenv("PBS2P_DATABASE_URL", db_url)
    try:
        assert main(["db", "current"]) == 0
        assert "0001 without alembic_version" in capsys.readouterr().out
        assert version_of_or_none(engine) is None  # `current` changes nothing
        assert main(["db", "upgrade"]) == 0
        assert f"0001 (unversioned) -> {HEAD}" in capsys.readouterr().out
        assert main(["db", "upgrade"]) == 0
        assert f"already at {HEAD} (head)" in capsys.readouterr().out
        assert main(["db", "current"]) == 0
        assert capsys.readouterr().out.strip() == f"{HEAD} (head)"
        assert main(["db", "downgrade", "0001"]) == 0
        assert capsys.readouterr().out.startswith(f"0001 (head is {HEAD}")
        assert json.loads(rows(engine, "jobs", "seq")[0]["config"]) == FULL_V1
        assert main(["db", "downgrade", "0042"]) == 2
        assert "back to '0042'" in capsys.readouterr().err
        assert main(["db", "upgrade"]) == 0
        assert f"upgraded 0001 -> {HEAD}" in capsys.readouterr().out
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'abcdef'"))
        assert main(["db", "upgrade"]) == 2
        assert "revision 'abcdef'" in capsys.readouterr().err
    finally:
        engine.dispose()


def version_of_or_none(engine: Engine) -> list[str] | None:
    return version_of(engine) if "alembic_version" in inspect(engine).get_table_names() else None


# -- 0003: priority and the lifecycle columns -----------------------------------------------------------------
def test_0003_adds_the_columns_to_existing_rows_and_its_downgrade_drops_them(db_url: str) -> None:
    engine = engine_of(db_url)
    fill_legacy(engine)
    try:
        upgrade_to(engine, "0002", legacy=True)
        at_0002 = rows(engine, "jobs", "seq")
        store = JobStore(db_url)  # to the head (0003, then 0004: a table of its own)
        try:
            after = rows(engine, "jobs", "seq")
            assert [{k: v for k, v in r.items() if k not in NEW_IN_0003} for r in after] == at_0002
            assert all({k: r[k] for k in NEW_IN_0003} == NEW_IN_0003 for r in after)
            urgent, _ = store.create_job("acme", "org/new", {"method": "pbs2p"}, priority=3)
            assert store.get(urgent.id).priority == 3  # type: ignore[union-attr]
            claimed = store.claim("o")  # acme's queued legacy job (priority 0) waits behind the new one
            assert claimed is not None and claimed.id == urgent.id and claimed.claimed_at is not None
        finally:
            store.close()
        migrations.downgrade(engine, "0002")
        assert version_of(engine) == ["0002"]
        back = rows(engine, "jobs", "seq")
        assert not set(NEW_IN_0003) & set(back[0])
        assert back[: len(at_0002)] == at_0002  # the rows as they were (the claim took only the new job)
        assert "ix_jobs_tenant_claimed" not in {i["name"] for i in inspect(engine).get_indexes("jobs")}
        assert {i["name"] for i in inspect(engine).get_indexes("jobs")} >= {"ix_jobs_state_seq", "ix_jobs_tenant_seq"}
        migrations.upgrade(engine)
        assert version_of(engine) == [HEAD]
    finally:
        engine.dispose()


# -- 0004: the webhook outbox ---------------------------------------------------------------------------------
def test_0004_adds_the_outbox_table_and_its_downgrade_drops_it(db_url: str) -> None:
    engine = engine_of(db_url)
    fill_legacy(engine)
    try:
        upgrade_to(engine, "0003", legacy=True)
        with engine.begin() as conn:  # a queued job submitted with a webhook before 0004
            conn.execute(text("UPDATE jobs SET webhook_url = 'http://127.0.0.1:9/hook' WHERE state = 'QUEUED'"))
        at_0003 = rows(engine, "jobs", "seq")
        hooked = next(r["id"] for r in at_0003 if r["webhook_url"])
        store = JobStore(db_url)  # to 0004
        try:
            assert version_of(engine) == [HEAD] and rows(engine, "jobs", "seq") == at_0003
            assert rows(engine, "webhook_deliveries", "seq") == []
            found = inspect(engine).get_indexes("webhook_deliveries")  # PostgreSQL lists the unique one's too
            indexes = {i["name"]: i["column_names"] for i in found if str(i["name"]).startswith("ix_")}
            assert indexes == {"ix_webhook_deliveries_due": ["due_at"], "ix_webhook_deliveries_job": ["job_id"]}
            assert store.transition(hooked, [JobState.QUEUED], JobState.CANCELLED)  # its event joins the outbox
            (delivery,) = rows(engine, "webhook_deliveries", "seq")
            assert delivery["job_id"] == hooked and delivery["attempts"] == 0 and delivery["due_at"] is not None
            assert json.loads(delivery["body"])["job"]["state"] == "CANCELLED"
        finally:
            store.close()
        migrations.downgrade(engine, "0003")
        assert version_of(engine) == ["0003"] and "webhook_deliveries" not in inspect(engine).get_table_names()
        assert len(rows(engine, "jobs", "seq")) == len(at_0003)  # the jobs stay
        migrations.upgrade(engine)
        assert version_of(engine) == [HEAD] and rows(engine, "webhook_deliveries", "seq") == []
    finally:
        engine.dispose()
