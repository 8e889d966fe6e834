"""Alembic revisions of the job store, oldest first (0001, 0002, ...); loaded by Alembic, not imported."""
