"""psycopg 3's own prepared statements (``postgresql+psycopg://``), on real PostgreSQL:

- the metrics exporter (``StatsReader``, ``celery-sagas metrics``) prepares nothing when
  ``prepared_statements`` is off (a pooler in transaction mode).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from celery_sagas.cli import cli
from celery_sagas.store import SqlSagaStore, upgrade
from celery_sagas.store.engine import autocommit_engine, shared_engine
from celery_sagas.store.stats import StatsReader
from celery_sagas.store.tables import sagas
from tests.integration.test_store_contract import (
    create,
    on_psycopg3,
)

HOT = 8  # runs of a statement: more than psycopg's prepare_threshold (5)
# text -> varchar: every statement that returns saga.reason gets a new result type
MIGRATION = "ALTER TABLE saga ALTER COLUMN reason TYPE varchar(1000)"
READ = sa.select(sagas).where(sagas.c.id == sa.bindparam("p_id"))


@pytest.fixture
def migrated(pg_database: str) -> str:
    """A migrated database of this test's (psycopg2's URL: the migration's connection)."""
    upgrade(pg_database)
    return pg_database


def prepared_on(conn: sa.Connection) -> int:
    """The statements prepared in ``conn``'s session (``pg_prepared_statements`` is per
    session)."""
    return int(conn.execute(sa.text("SELECT count(*) FROM pg_prepared_statements")).scalar_one())


def migrate(url: str) -> None:
    """``MIGRATION`` from another connection, while the store's keep their plans."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(MIGRATION))
    finally:
        engine.dispose()


def sqlstate(error: BaseException) -> str | None:
    return getattr(getattr(error, "orig", None), "sqlstate", None)


# --------------------------------------------------------------------------- the exporter


@pytest.mark.parametrize("prepare", [True, False], ids=["prepared", "unprepared"])
def test_stats_reader_prepares_nothing_when_told_not_to(migrated: str, prepare: bool) -> None:
    """``StatsReader(prepare=False)``: psycopg 3 gets ``prepare_threshold=None``, so however
    often a scrape runs the same queries, none is prepared on the server (behind pgbouncer
    in transaction mode a prepared ``_pg3_N`` would not be there at the next scrape)."""
    create(SqlSagaStore(on_psycopg3(migrated)), saga_id="s")
    reader = StatsReader(on_psycopg3(migrated, application_name="reader"), prepare=prepare)
    try:
        for _ in range(HOT):
            assert reader().started("toy") == 1
        with reader.engine.connect() as conn:  # the pool's one connection: every scrape's
            threshold = conn.connection.driver_connection.prepare_threshold
            assert (threshold is None) is not prepare
            assert (prepared_on(conn) > 0) is prepare
    finally:
        reader.engine.dispose()


class Served:
    """``metrics.serve`` for the command under test: keeps the reader, serves nothing."""

    port = 0

    def __init__(self) -> None:
        self.reader: Any = None

    def __call__(self, reader: Any, *_: Any, **__: Any) -> Served:
        self.reader = reader
        return self

    def wait(self) -> None:
        pass


@pytest.mark.parametrize(
    ("args", "env", "threshold"),
    [
        ((), {}, 5),
        (("--no-prepared-statements",), {}, None),
        ((), {"SAGAS_PREPARED_STATEMENTS": "false"}, None),
        ((), {"SAGAS_PREPARED_STATEMENTS": "true"}, 5),
        (("--prepared-statements",), {"SAGAS_PREPARED_STATEMENTS": "false"}, 5),
    ],
    ids=["default", "flag-off", "env-off", "env-on", "flag-over-env"],
)
def test_metrics_command_honours_prepared_statements(
    migrated: str,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    env: dict[str, str],
    threshold: int | None,
) -> None:
    """``celery-sagas metrics``: ``--[no-]prepared-statements``, else the app's setting,
    else ``SAGAS_PREPARED_STATEMENTS``; its reader's connections follow it."""
    served = Served()
    monkeypatch.setattr("celery_sagas.metrics.serve", served)
    url = on_psycopg3(migrated, application_name=f"exporter-{'-'.join(args) or 'default'}")
    command = ["--database-url", url, "metrics", "--port", "0", *args]
    result = CliRunner().invoke(cli, command, env={"SAGAS_CELERY_APP": None, **env})
    assert result.exit_code == 0, result.output
    try:
        with served.reader.engine.connect() as conn:
            assert conn.connection.driver_connection.prepare_threshold == threshold
    finally:
        served.reader.engine.dispose()


def test_metrics_command_refuses_a_prepared_statements_it_would_misread(
    migrated: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SAGAS_PREPARED_STATEMENTS=False`` is not JSON: the settings would read the text
    (true); the exporter says so instead of preparing behind the operator's back."""
    monkeypatch.setattr("celery_sagas.metrics.serve", Served())
    command = ["--database-url", on_psycopg3(migrated), "metrics", "--port", "0"]
    env = {"SAGAS_CELERY_APP": None, "SAGAS_PREPARED_STATEMENTS": "False"}
    result = CliRunner().invoke(cli, command, env=env)
    assert result.exit_code == 2  # a usage error: fix the configuration
    assert "prepared_statements must be true or false, got 'False'" in result.output


@pytest.fixture(autouse=True)
def _dispose_shared(migrated: str) -> Iterator[None]:
    """The process's engines of this test's database, closed before it is dropped."""
    yield
    for url in (on_psycopg3(migrated), migrated):
        shared_engine(url).dispose()
        autocommit_engine(url).dispose()
