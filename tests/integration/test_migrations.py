"""Migrations: a fresh ``upgrade()`` gives exactly ``tables.metadata``, on SQLite and PostgreSQL,
with a version table of our own that leaves the application's Alembic history alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from celery_sagas.store import migrate, shared_engine, upgrade
from celery_sagas.store.tables import metadata

SAGA_TABLES = set(metadata.tables)  # every table the models declare


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL database."""
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_database")
    yield url
    shared_engine(url).dispose()  # before the database is dropped


def schema_differences(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "compare_server_default": True,
                "version_table": migrate.VERSION_TABLE,
            },
        )
        return list(compare_metadata(context, metadata))


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade_of_an_empty_database_gives_exactly_the_declared_schema(empty_url: str) -> None:
    engine = shared_engine(empty_url)
    assert migrate.current_revision(engine) is None
    assert upgrade(empty_url) == migrate.head_revision()
    assert schema_differences(engine) == []
    assert table_names(engine) == SAGA_TABLES | {migrate.VERSION_TABLE}


def test_upgrade_is_idempotent(empty_url: str) -> None:
    engine = shared_engine(empty_url)
    head = migrate.head_revision()
    assert head is not None
    assert upgrade(empty_url) == head
    assert upgrade(empty_url) == head
    assert upgrade(engine) == head
    assert migrate.current_revision(engine) == head
    with engine.connect() as conn:
        versions = conn.execute(sa.text(f"SELECT version_num FROM {migrate.VERSION_TABLE}"))
        assert versions.scalars().all() == [head]
    assert schema_differences(engine) == []


def test_the_applications_alembic_version_is_left_alone(empty_url: str) -> None:
    engine = shared_engine(empty_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('app_0042')"))
        conn.execute(sa.text("CREATE TABLE app_orders (id INTEGER PRIMARY KEY)"))
    upgrade(empty_url)
    with engine.connect() as conn:
        app_versions = conn.execute(sa.text("SELECT version_num FROM alembic_version"))
        assert app_versions.scalars().all() == ["app_0042"]
        assert MigrationContext.configure(conn).get_current_revision() == "app_0042"
    assert migrate.current_revision(engine) == migrate.head_revision()
    assert table_names(engine) == SAGA_TABLES | {
        migrate.VERSION_TABLE,
        "alembic_version",
        "app_orders",
    }


def test_downgrade_to_base_then_upgrade_again(empty_url: str) -> None:
    engine = shared_engine(empty_url)
    upgrade(empty_url)
    command.downgrade(migrate.alembic_config(engine), "base")
    assert migrate.current_revision(engine) is None
    assert table_names(engine) & SAGA_TABLES == set()
    assert upgrade(empty_url) == migrate.head_revision()
    assert schema_differences(engine) == []


def partial_indexes() -> dict[str, str]:
    """The declared partial indexes and the column their predicate tests."""
    found = {}
    for table in metadata.tables.values():
        for index in table.indexes:
            where = index.dialect_options["postgresql"]["where"]
            if where is not None:
                found[str(index.name)] = str(where.compile()).split(".")[-1].split()[0]
    return found


def test_partial_indexes_stay_partial(empty_url: str) -> None:
    # compare_metadata does not compare index predicates; check them by hand.
    assert {"ix_saga_outbox_unsent"} <= set(partial_indexes())
    engine = shared_engine(empty_url)
    upgrade(empty_url)
    if engine.dialect.name == "postgresql":
        query = "SELECT indexdef FROM pg_indexes WHERE indexname = :name"
    else:
        query = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :name"
    with engine.connect() as conn:
        for name, column in partial_indexes().items():
            definition = conn.execute(sa.text(query), {"name": name}).scalar_one()
            predicate = definition.upper().partition(" WHERE ")[2]
            assert column.upper() in predicate, (name, definition)


def test_the_migration_history_has_one_head() -> None:
    config = Config()
    config.set_main_option("script_location", migrate.SCRIPT_LOCATION)
    heads = ScriptDirectory.from_config(config).get_heads()
    assert heads == [migrate.head_revision()]
    assert migrate.VERSION_TABLE == "celery_sagas_alembic_version"
