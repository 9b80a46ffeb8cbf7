"""The few things PostgreSQL and SQLite do differently around the same statements: the
upsert, row locks, serialising admissions, a commit that need not wait for the disk, and
the stats reader's snapshot, durations and id lists.

A store holds its database's ``Backend`` and asks it, instead of testing which database
it is on: each class below is its database's way, read straight through.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Connection, String, Table, any_, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite

from celery_sagas.errors import DatabaseUrlError
from celery_sagas.store.drivers import URLS


class Backend(Protocol):
    name: str

    def insert(self, table: Table) -> Any:
        """An INSERT that has ``on_conflict_do_nothing`` / ``on_conflict_do_update``."""

    def skip_locked(self, query: Any, of: Table | None = None) -> Any:
        """``query`` taking rows no other scanner holds, locked until the commit."""

    def lock(self, query: Any) -> Any:
        """``query`` locking its rows until the commit (waiting for another holder)."""

    def one_at_a_time(self, conn: Connection, key: int) -> None:
        """Wait until no other transaction holds ``key``; hold it until the commit."""

    def relax_commit(self, conn: Connection) -> None:
        """Let this transaction's commit skip waiting for the disk (a write whose loss
        is harmless, such as a message marked sent)."""

    def read_snapshot(self, conn: Connection, statement_timeout: float) -> None:
        """Make this transaction's reads one consistent, read-only snapshot whose statements
        give up after ``statement_timeout`` seconds (as far as the database can)."""

    def seconds(self, start: Any, end: Any) -> ColumnElement[Any]:
        """The seconds from ``start`` to ``end``, a floating-point number."""

    def one_of(self, column: Any, values: Collection[str], name: str) -> ColumnElement[bool]:
        """``column`` equal to one of ``values`` (not empty), bound as ``name``."""


class PostgresBackend:
    """PostgreSQL: ``FOR UPDATE [SKIP LOCKED]`` row locks, transaction-scoped advisory
    locks, ``synchronous_commit`` off per transaction, and a repeatable-read snapshot."""

    name = "postgresql"

    def insert(self, table: Table) -> Any:
        return postgresql.insert(table)

    def skip_locked(self, query: Any, of: Table | None = None) -> Any:
        return query.with_for_update(skip_locked=True, of=of)

    def lock(self, query: Any) -> Any:
        return query.with_for_update()

    def one_at_a_time(self, conn: Connection, key: int) -> None:
        conn.execute(select(func.pg_advisory_xact_lock(key)))

    def relax_commit(self, conn: Connection) -> None:
        conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")

    def read_snapshot(self, conn: Connection, statement_timeout: float) -> None:
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(statement_timeout * 1000)}")

    def seconds(self, start: Any, end: Any) -> ColumnElement[Any]:
        return func.date_part("epoch", end - start)  # double precision (EXTRACT is numeric)

    def one_of(self, column: Any, values: Collection[str], name: str) -> ColumnElement[bool]:
        # one array parameter, however many values
        array = bindparam(name, list(values), type_=postgresql.ARRAY(String))
        return column == any_(array)  # type: ignore[no-any-return]


class SqliteBackend:
    """SQLite: one writer at a time (every write transaction begins IMMEDIATE: see
    ``engine``), so a write transaction has the database to itself and there is nothing
    to lock; ``synchronous=NORMAL`` already spares commits the disk wait."""

    name = "sqlite"

    def insert(self, table: Table) -> Any:
        return sqlite.insert(table)

    def skip_locked(self, query: Any, of: Table | None = None) -> Any:
        return query

    def lock(self, query: Any) -> Any:
        return query

    def one_at_a_time(self, conn: Connection, key: int) -> None:
        return None

    def relax_commit(self, conn: Connection) -> None:
        return None

    def read_snapshot(self, conn: Connection, statement_timeout: float) -> None:
        return None  # a read transaction already sees one snapshot; no statement timeout

    def seconds(self, start: Any, end: Any) -> ColumnElement[Any]:
        return (func.julianday(end) - func.julianday(start)) * 86400.0

    def one_of(self, column: Any, values: Collection[str], name: str) -> ColumnElement[bool]:
        return column.in_(list(values))  # type: ignore[no-any-return]


POSTGRES = PostgresBackend()
SQLITE = SqliteBackend()
BACKENDS: dict[str, Backend] = {POSTGRES.name: POSTGRES, SQLITE.name: SQLITE}


def backend_named(name: str) -> Backend:
    """The backend of SQLAlchemy dialect ``name`` (``DatabaseUrlError`` for another)."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise DatabaseUrlError(
            f"unsupported database {name!r}: celery-sagas stores sagas in PostgreSQL "
            f"({URLS}) or SQLite"
        ) from None
