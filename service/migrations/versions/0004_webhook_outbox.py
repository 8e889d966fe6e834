"""webhook_outbox: the table `webhook_deliveries`, the webhook events of job state changes waiting to be delivered.

Each row is written in the transaction of the state change it reports (service/outbox.py) and delivered by a worker
process: `due_at` (float, null) is the time of its next attempt, or the end of a worker's claim on it, and is null
once it is done (`delivered_at` or `given_up_at`); `attempts` counts the claims; `claimed_by`, `last_attempt_at`
and `last_error` say who tried last, when, and what the last failure got. Indexes: `ix_webhook_deliveries_due`
(the due rows, oldest first) and `ix_webhook_deliveries_job`. No foreign key to `jobs`: an event outlives the
removal of its job (a `job.deleted` is sent after the row is gone).

No existing row changes; the downgrade drops the table (deliveries still pending are lost, as before this revision).

Written by hand against the tables as the previous revision left them; no import of the models or of pbs2p_core.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_deliveries",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(40), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("due_at", sa.Float(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("claimed_by", sa.String(200), nullable=True),
        sa.Column("last_attempt_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", sa.Float(), nullable=True),
        sa.Column("given_up_at", sa.Float(), nullable=True),
        sa.UniqueConstraint("event_id"),  # unnamed, as the model declares it (unique=True)
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["due_at"])
    op.create_index("ix_webhook_deliveries_job", "webhook_deliveries", ["job_id"])


def downgrade() -> None:
    op.drop_table("webhook_deliveries")  # its indexes go with it
