"""The few things PostgreSQL and SQLite do differently around the same statements: the
upsert, row locks, serialising admissions and a commit that need not wait for the disk.

A store holds its database's ``Backend`` and asks it, instead of testing which database
it is on: each class below is its database's way, read straight through.
"""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy import Connection, Table, func, select
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


class PostgresBackend:
    """PostgreSQL: ``FOR UPDATE [SKIP LOCKED]`` row locks, transaction-scoped advisory
    locks, and ``synchronous_commit`` off per transaction."""

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
