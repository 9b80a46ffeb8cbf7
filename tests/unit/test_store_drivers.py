"""psycopg2 and psycopg 3: the store PREPAREs the hot path's statements by hand on psycopg2
only; psycopg 3 prepares them itself, and gets ``prepare_threshold=None`` where nothing may
be prepared (no database needed: engines connect lazily)."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from sqlalchemy.dialects import postgresql, sqlite

from celery_sagas import machine
from celery_sagas.errors import DatabaseUrlError
from celery_sagas.machine import Begin, SagaView, StepStatus, StepView
from celery_sagas.protocols import NewSaga
from celery_sagas.store import PostgresSagaStore, SqlSagaStore, one_statement
from celery_sagas.store.drivers import (
    engine_options,
    forget_prepared,
    prepares_by_hand,
    sqlstate,
)
from celery_sagas.store.prepared import Prepared
from celery_sagas.store.tables import sagas

PSYCOPG2_URL = "postgresql+psycopg2://sagas@127.0.0.1:1/never_connected"
PSYCOPG_URL = "postgresql+psycopg://sagas@127.0.0.1:1/never_connected"
NOW = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("url", "by_hand"), [(PSYCOPG2_URL, True), (PSYCOPG_URL, False)], ids=["psycopg2", "psycopg"]
)
def test_only_psycopg2_runs_the_hand_prepared_statements(url: str, by_hand: bool) -> None:
    store = SqlSagaStore(url)
    assert type(store) is PostgresSagaStore and store.prepare is True
    assert store._begin_step.enabled is by_hand
    view = SagaView("s", "toy", None, 0, 0, (StepView(0, "one", StepStatus.PENDING),))
    decision = machine.decide(view, Begin(admit=True), NOW)
    new = NewSaga("s", "toy", "k", {}, "hash", ("one",), None, None)
    shape, _ = one_statement.shape_and_parameters(new, decision, [], NOW)
    assert one_statement.prepared(shape, store.engine.dialect, True).enabled is by_hand


def test_a_psycopg3_prepared_statement_runs_as_itself() -> None:
    dialect = postgresql.psycopg.dialect()  # type: ignore[attr-defined]
    statement = sagas.select()
    prepared = Prepared(statement, dialect, enabled=True)
    assert prepared.enabled is False
    assert prepares_by_hand(postgresql.psycopg2.dialect(), True)  # type: ignore[attr-defined]
    assert not prepares_by_hand(postgresql.psycopg2.dialect(), False)  # type: ignore[attr-defined]
    assert not prepares_by_hand(sqlite.dialect(), True)


def test_psycopg3_prepares_nothing_when_the_store_must_not_prepare() -> None:
    """Behind a pooler in transaction mode (``prepare=False``) psycopg 3's own automatic
    preparation is off too; the caller's own connect_args win."""
    assert engine_options(PSYCOPG_URL, False, {"pool_size": 2}) == {
        "pool_size": 2,
        "connect_args": {"prepare_threshold": None},
    }
    mine = {"connect_args": {"prepare_threshold": 20, "application_name": "me"}}
    assert engine_options(PSYCOPG_URL, False, mine) == mine
    assert engine_options(PSYCOPG_URL, True, {}) == {}
    assert engine_options(PSYCOPG2_URL, False, {}) == {}
    assert engine_options("sqlite://", False, {}) == {}


def test_an_error_code_is_read_from_either_driver() -> None:
    class Psycopg2Error(Exception):
        pgcode = "42P01"

    class Psycopg3Error(Exception):
        sqlstate = "3D000"

    assert sqlstate(Psycopg2Error()) == "42P01"
    assert sqlstate(Psycopg3Error()) == "3D000"
    assert sqlstate(Exception()) is None


@pytest.mark.parametrize(
    "url", ["postgresql+asyncpg://sagas@db/sagas", "postgresql+pg8000://sagas@db/sagas"]
)
def test_another_postgresql_driver_is_refused_naming_both(url: str) -> None:
    with pytest.raises(DatabaseUrlError, match=r"postgresql\+psycopg2://.*postgresql\+psycopg://"):
        SqlSagaStore(url)


def test_forget_prepared_needs_psycopgs_cache() -> None:
    """A connection without psycopg 3's prepared-statement cache: nothing to forget (the
    engine then discards the connection instead; tests/integration/test_psycopg3_prepared.py
    runs the real one)."""
    assert forget_prepared(object()) is False
    cleared: list[bool] = []
    connection = SimpleNamespace(_prepared=SimpleNamespace(clear=lambda: cleared.append(True)))
    assert forget_prepared(connection) is True and cleared == [True]
