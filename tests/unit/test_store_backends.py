"""``SqlSagaStore(url_or_engine)`` makes the store of that database, and each backend
writes its own SQL for the few things PostgreSQL and SQLite do differently (compiled
here, no database needed; the contract suite runs both stores on real databases)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.dialects import postgresql, sqlite

from celery_sagas.errors import DatabaseUrlError
from celery_sagas.store import PostgresSagaStore, SqliteSagaStore, SqlSagaStore
from celery_sagas.store.backends import POSTGRES, SQLITE, Backend, backend_named
from celery_sagas.store.tables import guards, sagas

PG_URL = "postgresql+psycopg2://sagas:s3cret@127.0.0.1:1/never_connected"


@pytest.mark.parametrize(
    ("url", "store_class"),
    [
        (PG_URL, PostgresSagaStore),
        ("sqlite://", SqliteSagaStore),
        ("sqlite:///sagas.db", SqliteSagaStore),
    ],
)
def test_the_constructor_makes_the_store_of_the_urls_database(
    url: str, store_class: type[SqlSagaStore]
) -> None:
    store = SqlSagaStore(url, prepare=False)
    assert type(store) is store_class
    assert store.backend.name == store.engine.dialect.name
    assert store.prepare is False


def test_the_constructor_takes_an_engine_of_the_callers() -> None:
    engine = create_engine("sqlite://")
    store = SqlSagaStore(engine)
    assert type(store) is SqliteSagaStore
    assert store.engine is engine


def test_repr_names_the_backend_and_hides_the_password() -> None:
    text = repr(SqlSagaStore(PG_URL))
    assert text.startswith("PostgresSagaStore(")
    assert "s3cret" not in text


@pytest.mark.parametrize(
    ("store_class", "url"), [(PostgresSagaStore, "sqlite://"), (SqliteSagaStore, PG_URL)]
)
def test_a_backends_store_refuses_another_database(
    store_class: type[SqlSagaStore], url: str
) -> None:
    with pytest.raises(DatabaseUrlError, match=store_class.__name__):
        store_class(url)


class CountingSqliteStore(SqliteSagaStore):
    """A user's subclass of a backend's store (no ``backend=`` of its own)."""


def test_a_subclass_of_a_backends_store_is_made_as_itself() -> None:
    store = CountingSqliteStore("sqlite://")
    assert type(store) is CountingSqliteStore
    assert store.backend is SQLITE
    assert type(SqlSagaStore("sqlite://")) is SqliteSagaStore
    with pytest.raises(DatabaseUrlError, match="CountingSqliteStore"):
        CountingSqliteStore(PG_URL)


@pytest.mark.parametrize("url", ["mysql://sagas@db/sagas", "not a url"])
def test_another_database_is_refused(url: str) -> None:
    with pytest.raises(DatabaseUrlError):
        SqlSagaStore(url)


def test_an_unknown_dialect_name_is_refused() -> None:
    with pytest.raises(DatabaseUrlError, match="oracle"):
        backend_named("oracle")


def _sql(statement: Any, backend: Backend) -> str:
    dialect = postgresql.dialect() if backend is POSTGRES else sqlite.dialect()
    return str(statement.compile(dialect=dialect))


@pytest.mark.parametrize(
    ("backend", "skip_locked", "lock"),
    [
        (POSTGRES, "FOR UPDATE OF saga SKIP LOCKED", "FOR UPDATE"),
        (SQLITE, None, None),
    ],
)
def test_each_backend_locks_rows_its_own_way(
    backend: Backend, skip_locked: str | None, lock: str | None
) -> None:
    query = select(sagas.c.id).where(sagas.c.state == "PENDING")
    for sql, expected in (
        (_sql(backend.skip_locked(query, of=sagas), backend), skip_locked),
        (_sql(backend.lock(query), backend), lock),
    ):
        if expected is None:
            assert "FOR UPDATE" not in sql
        else:
            assert sql.rstrip().endswith(expected)


@pytest.mark.parametrize("backend", [POSTGRES, SQLITE])
def test_each_backend_has_an_upsert(backend: Backend) -> None:
    statement = backend.insert(guards).values(key="k").on_conflict_do_nothing()
    assert "ON CONFLICT DO NOTHING" in _sql(statement, backend)


@pytest.mark.parametrize(
    ("backend", "seconds", "one_of"),
    [
        (POSTGRES, "date_part(", "saga.id = ANY ("),
        (SQLITE, "julianday(", "saga.id IN ("),
    ],
)
def test_each_backend_writes_the_stats_readers_shapes(
    backend: Backend, seconds: str, one_of: str
) -> None:
    query = select(backend.seconds(sagas.c.created_at, sagas.c.finished_at)).where(
        backend.one_of(sagas.c.id, ["a", "b"], "ids")
    )
    sql = _sql(query, backend)
    assert seconds in sql
    assert one_of in sql
