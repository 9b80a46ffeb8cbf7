"""Alembic environment for the saga schema; the engine comes from ``config.attributes``."""

from __future__ import annotations

from alembic import context

from celery_sagas.store.migrate import VERSION_TABLE
from celery_sagas.store.tables import metadata

engine = context.config.attributes["engine"]

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=engine.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
