"""psycopg 3's own prepared statements (``postgresql+psycopg://``), on real PostgreSQL:

- the metrics exporter (``StatsReader``, ``celery-sagas metrics``) prepares nothing when
  ``prepared_statements`` is off (a pooler in transaction mode);
- a migration that changes the type of a column a prepared statement returns (SQLSTATE
  0A000, "cached plan must not change result type") costs the hot path nothing, and any
  other statement one failure (psycopg 3 itself recovers only in a transaction).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from celery_sagas import machine
from celery_sagas.cli import cli
from celery_sagas.machine import Decision, StepSucceeded
from celery_sagas.protocols import OutboxMessage, SagaRecord
from celery_sagas.store import SqlSagaStore, upgrade
from celery_sagas.store.engine import autocommit_engine, shared_engine
from celery_sagas.store.stats import StatsReader
from celery_sagas.store.tables import sagas
from tests.integration.test_store_contract import (
    EXPECTED,
    at,
    create,
    keyed_message,
    on_psycopg3,
    update,
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


def test_metrics_command_refuses_a_prepared_statements_it_cannot_read(
    migrated: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SAGAS_PREPARED_STATEMENTS=maybe`` is neither true nor false: the exporter says so
    instead of guessing behind the operator's back."""
    monkeypatch.setattr("celery_sagas.metrics.serve", Served())
    command = ["--database-url", on_psycopg3(migrated), "metrics", "--port", "0"]
    env = {"SAGAS_CELERY_APP": None, "SAGAS_PREPARED_STATEMENTS": "maybe"}
    result = CliRunner().invoke(cli, command, env=env)
    assert result.exit_code == 2  # a usage error: fix the configuration
    assert "prepared_statements must be true or false, got 'maybe'" in result.output


# --------------------------------------------------------------------------- 0A000


def succeed(record: SagaRecord) -> tuple[Decision, list[OutboxMessage]]:
    decision = machine.decide(record.view(), StepSucceeded(0, 1, "r"), at(3))
    return decision, keyed_message(record.saga_id, decision)


def start(store: SqlSagaStore, saga_id: str) -> None:
    """A start and its first step begun: two of the statements a worker runs all day."""
    record = create(store, saga_id, saga_id=saga_id).record
    assert store.begin_step(f"{saga_id}:0", saga_id, at(1), EXPECTED) == (None, record)


def finish_step(store: SqlSagaStore, saga_id: str) -> None:
    """The step's success: the third (after a ``load``)."""
    _, decision, written = update(store, saga_id, succeed, at(3))
    assert decision is not None and decision.accepted and len(written) == 1


@pytest.mark.parametrize("engine", ["store's", "caller's"])
def test_a_migration_under_psycopg3s_plans_costs_the_hot_path_nothing(
    migrated: str, engine: str
) -> None:
    """The hot path's statements, prepared by psycopg 3 on the store's autocommit
    connection, outlive a migration that changes a column they return: each runs once
    more after its connection forgot its prepared statements (psycopg2's re-PREPARE, for
    psycopg 3), on the store's engines and on a caller's (which has no error hook).

    On a caller's engine the reads share the autocommit pool, and a read's ROLLBACK makes
    psycopg forget everything: only statements run without a read between stay prepared."""
    url = on_psycopg3(migrated, application_name=f"migrated-under-{engine[:-2]}")
    caller = sa.create_engine(url) if engine == "caller's" else None
    store = SqlSagaStore(caller or url)
    try:
        for n in range(HOT):
            start(store, f"before-{n}")
        if caller is None:
            for n in range(HOT):
                finish_step(store, f"before-{n}")
        with store._autocommit.connect() as conn:
            assert prepared_on(conn) == (2 if caller else 3)  # create, begin_step (, write)
        migrate(migrated)
        for n in range(3):
            start(store, f"after-{n}")
            finish_step(store, f"after-{n}")
        loaded = store.load("after-2")
        assert loaded is not None and (loaded.version, loaded.current_step) == (2, 1)
    finally:
        for made in (store.engine, store._autocommit):
            made.dispose()


@pytest.mark.parametrize("engine", ["ours", "plain"])
def test_any_statement_in_autocommit_fails_once_on_our_engines(migrated: str, engine: str) -> None:
    """Another statement psycopg 3 prepared in autocommit fails with 0A000 once on the
    store's engines (nothing but ``Prepared`` runs a statement twice), then runs: the
    engine's error hook made the connection forget its plans. On a plain engine it fails
    every time (psycopg forgets them on a ROLLBACK only)."""
    url = on_psycopg3(migrated, application_name=f"autocommit-{engine}")
    if engine == "ours":
        made = autocommit_engine(url)
    else:
        made = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    create(SqlSagaStore(on_psycopg3(migrated)), saga_id="s")
    try:
        with made.connect() as conn:
            for _ in range(HOT):
                assert conn.execute(READ, {"p_id": "s"}).one().id == "s"
            assert prepared_on(conn) == 1
            migrate(migrated)
            with pytest.raises(sa.exc.NotSupportedError) as failed:
                conn.execute(READ, {"p_id": "s"})
            assert sqlstate(failed.value) == "0A000"
            if engine == "ours":
                assert conn.execute(READ, {"p_id": "s"}).one().reason is None
            else:
                with pytest.raises(sa.exc.NotSupportedError):
                    conn.execute(READ, {"p_id": "s"})
    finally:
        made.dispose()


def test_psycopg3_recovers_by_itself_in_a_transaction(migrated: str) -> None:
    """In a transaction psycopg 3 needs no help: the failed transaction's ROLLBACK makes it
    forget its prepared statements (the store's reads and multi-statement writes)."""
    engine = sa.create_engine(on_psycopg3(migrated, application_name="transactions"))
    create(SqlSagaStore(on_psycopg3(migrated)), saga_id="s")
    try:
        for _ in range(HOT):
            with engine.begin() as conn:
                assert conn.execute(READ, {"p_id": "s"}).one().id == "s"
        with engine.begin() as conn:  # committed: a ROLLBACK would forget it
            assert prepared_on(conn) == 1
        migrate(migrated)
        with pytest.raises(sa.exc.NotSupportedError) as failed, engine.begin() as conn:
            conn.execute(READ, {"p_id": "s"})
        assert sqlstate(failed.value) == "0A000"
        with engine.begin() as conn:
            assert conn.execute(READ, {"p_id": "s"}).one().reason is None
    finally:
        engine.dispose()


@pytest.fixture(autouse=True)
def _dispose_shared(migrated: str) -> Iterator[None]:
    """The process's engines of this test's database, closed before it is dropped."""
    yield
    for url in (on_psycopg3(migrated), migrated):
        shared_engine(url).dispose()
        autocommit_engine(url).dispose()
