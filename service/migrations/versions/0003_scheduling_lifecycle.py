"""scheduling_lifecycle: per-job priority and the columns fair claiming, deletion, retention and webhooks need.

- `priority` (integer, not null, 0 for every existing row): within a tenant, higher runs first.
- `claimed_at` (float, null): when a dispatcher last claimed the job; a tenant's newest is when it was last served
  (the claim's round robin over tenants), read through the new index `ix_jobs_tenant_claimed`.
- `webhook_url` (text, null): where the job's state changes are posted.
- `artifact_expired_at` (float, null): when retention removed the artifact (the job and its metrics stay).
- `deleted_at` (float, null): DELETE of a running job: hidden at once, removed once its dispatcher has stopped it.

Existing rows keep every value; the downgrade drops the columns and the index (the rows stay).

Written by hand against the tables as the previous revision left them; no import of the models or of pbs2p_core.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

COLUMNS = ("priority", "claimed_at", "webhook_url", "artifact_expired_at", "deleted_at")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite: ADD COLUMN in place (no table copy needed)
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("claimed_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("webhook_url", sa.Text(), nullable=True))
        batch.add_column(sa.Column("artifact_expired_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("deleted_at", sa.Float(), nullable=True))
    op.create_index("ix_jobs_tenant_claimed", "jobs", ["tenant", "claimed_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_claimed", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:  # SQLite: the table is copied without the columns
        for name in reversed(COLUMNS):
            batch.drop_column(name)
