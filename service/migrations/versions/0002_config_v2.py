"""config_v2: every stored job config from version 1 (flat) to version 2 (the ablations nested under "ablations").

Version 2 is version 1 with the 14 keys of ABLATIONS moved, values unchanged, into the object "ablations", and
"version": 2. A key a row does not have stays absent; a row already at version 2 is left as it is. A config without
"version" is version 1 (the config's default then) and comes out with "version": 2 (and "version": 1 when
downgraded). Rows that are not a JSON object, or at another version, are left alone and logged.

`request_hash` is derived from the config (the store's sha256 of [model, config, evaluate, name], which makes a
repeated Idempotency-Key a replay), so it is recomputed with the new config, where it was the store's hash of the old
one: a client repeating a request after the upgrade, whose config the service now writes as version 2, gets the same
job instead of a conflict.

Self-contained: no import of pbs2p_core or of the models (a revision is frozen history).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

log = logging.getLogger("pbs2p.service.migrations")

ABLATIONS = (
    "spbo_mode",
    "cfs_score",
    "cfs_spread",
    "cfs_samples",
    "mask_score",
    "arb_iters",
    "arb_variant",
    "salient_search",
    "salient_allocation",
    "column_feedback",
    "scale_refit",
    "spbo_report",
    "scale_dtype",
    "true_sequential",
)
BATCH = 500  # rows read and written at a time

jobs = sa.table(
    "jobs",
    sa.column("seq", sa.Integer()),
    sa.column("name", sa.String()),
    sa.column("model", sa.Text()),
    sa.column("config", sa.Text()),
    sa.column("evaluate", sa.Text()),
    sa.column("request_hash", sa.String()),
)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))  # the store's convention


def _request_hash(model: str, config: Any, evaluate: str | None, name: str | None) -> str:
    """What the store computes at create time (JobStore.create_job), from the columns as stored."""
    ev = json.loads(evaluate) if evaluate else None
    return hashlib.sha256(_dumps([model, config, ev, name]).encode()).hexdigest()


def config_v1_to_v2(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The version 2 config of a version 1 one; None when `cfg` is not version 1."""
    if cfg.get("version", 1) != 1 or "ablations" in cfg:
        return None
    out = {k: v for k, v in cfg.items() if k not in ABLATIONS}
    out["ablations"] = {k: cfg[k] for k in ABLATIONS if k in cfg}
    out["version"] = 2
    return out


def config_v2_to_v1(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The flat version 1 config of a version 2 one; None when `cfg` is not version 2."""
    if cfg.get("version") != 2 or not isinstance(cfg.get("ablations", {}), dict):
        return None
    out = {k: v for k, v in cfg.items() if k != "ablations"}
    out.update(cfg.get("ablations", {}))
    out["version"] = 1
    return out


def _rewrite(convert: Callable[[dict[str, Any]], dict[str, Any] | None], source: int, target: int) -> None:
    bind = op.get_bind()
    write = (
        sa.update(jobs)
        .where(jobs.c.seq == sa.bindparam("b_seq"))
        .values(config=sa.bindparam("b_config"), request_hash=sa.bindparam("b_hash"))
    )
    last, changed = -1, 0
    while True:
        rows = bind.execute(sa.select(jobs).where(jobs.c.seq > last).order_by(jobs.c.seq).limit(BATCH)).all()
        if not rows:
            break
        last = rows[-1].seq
        updates = []
        for row in rows:
            try:
                old = json.loads(row.config)
            except ValueError:
                old = None
            new = convert(old) if isinstance(old, dict) else None
            if new is None:
                if not (isinstance(old, dict) and old.get("version", 1) == target):
                    log.warning("job row %s: config left as it is (not a version %d config)", row.seq, source)
                continue
            rehash = row.request_hash is not None and row.request_hash == _request_hash(
                row.model, old, row.evaluate, row.name
            )
            new_hash = _request_hash(row.model, new, row.evaluate, row.name) if rehash else row.request_hash
            updates.append({"b_seq": row.seq, "b_config": _dumps(new), "b_hash": new_hash})
        if updates:
            bind.execute(write, updates)
            changed += len(updates)
    log.info("job configs rewritten to version %d: %d", target, changed)


def upgrade() -> None:
    _rewrite(config_v1_to_v2, 1, 2)


def downgrade() -> None:
    _rewrite(config_v2_to_v1, 2, 1)
