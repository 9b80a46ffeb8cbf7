"""Schema migrations (Alembic) with a version table of our own, so they never collide with
the application's Alembic history."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from celery_sagas.store.engine import shared_engine

VERSION_TABLE = "celery_sagas_alembic_version"
SCRIPT_LOCATION = str(Path(__file__).with_name("migrations"))


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.attributes["engine"] = engine
    return config


def upgrade(url_or_engine: str | Engine, revision: str = "head") -> str | None:
    """Create or upgrade the saga schema; returns the revision now in place."""
    engine = shared_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    command.upgrade(alembic_config(engine), revision)
    return current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head_revision() -> str | None:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    return ScriptDirectory.from_config(config).get_current_head()
