"""Alembic's environment for the job store.

At run time (`JobStore(url)`, `pbs2p db upgrade`) service.migrations hands over a connection, already inside the
transaction that holds the migration lock: every revision runs in it and it commits once, at the end.

From the `alembic` command (developers: alembic.ini at the repository root) there is no connection: the database is
the service's own (PBS2P_DATABASE_URL, else the data directory's SQLite file), and the models are the target of
`alembic revision --autogenerate`. Revisions themselves never import the models (a revision is frozen history).
"""

from __future__ import annotations

from alembic import context

from pbs2p.service.jobrecords import Base
from pbs2p.service.jobstore import make_engine
from pbs2p.service.migrations import migration_transaction
from pbs2p.service.settings import Settings

config = context.config
connection = config.attributes.get("connection")

if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported: revision 0002 rewrites rows it has to read")

if connection is not None:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or Settings().db_url)
    try:
        with migration_transaction(engine) as conn:  # the same lock as the service's own upgrades
            context.configure(connection=conn, target_metadata=Base.metadata)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
