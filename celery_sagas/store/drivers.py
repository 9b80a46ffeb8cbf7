"""The two PostgreSQL drivers the store supports, and the little they do differently.

- psycopg2 (``postgresql+psycopg2://``, the default): interpolates values into the SQL text
  on the client, so PostgreSQL parses and plans every statement again; the hot path's
  statements are therefore PREPAREd by hand (``prepared.Prepared``).
- psycopg 3 (``postgresql+psycopg://``): binds values on the server, which a textual
  ``EXECUTE name($1, …)`` cannot take; it prepares a statement itself once it has run
  ``prepare_threshold`` times (5) on a connection, so ``Prepared`` runs the plain statement.
  Behind a pooler in transaction mode (the store's ``prepare=False``) a prepared name does
  not follow the client to the next server connection: ``prepare_threshold=None`` then.

A migration that changes the type of a column a prepared statement returns makes its next
run fail with SQLSTATE 0A000 ("cached plan must not change result type"), on every run
until the session forgets the statement. psycopg2's hand-prepared statements re-PREPARE
(``prepared``); psycopg 3 forgets its own on a ROLLBACK (a transaction's failure heals by
itself) but not in autocommit, where the hot path runs: ``forget_prepared`` then, and
``Prepared`` runs the statement again (``retries_changed_plan``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Dialect
from sqlalchemy.engine import make_url

PSYCOPG2, PSYCOPG = "psycopg2", "psycopg"
PLAN_CHANGED = "0A000"  # a schema change invalidated a prepared plan's result type
URLS = "postgresql+psycopg2:// (psycopg2, the default) or postgresql+psycopg:// (psycopg 3)"


def prepares_by_hand(dialect: Dialect, prepare: bool) -> bool:
    """Whether the hot path's statements are PREPAREd by hand on ``dialect``'s driver."""
    return prepare and dialect.name == "postgresql" and dialect.driver == PSYCOPG2


def engine_options(url: str, prepare: bool, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for an engine of ``url``, with what the driver needs when nothing may
    be prepared (psycopg 3: ``prepare_threshold=None``, unless the caller set one)."""
    parsed = make_url(url)
    if prepare or parsed.get_backend_name() != "postgresql" or parsed.get_driver_name() != PSYCOPG:
        return options
    connect_args = {"prepare_threshold": None, **options.get("connect_args", {})}
    return {**options, "connect_args": connect_args}


def sqlstate(error: Any) -> str | None:
    """The SQLSTATE of a driver error (psycopg2's ``pgcode``, psycopg 3's ``sqlstate``)."""
    return getattr(error, "pgcode", None) or getattr(error, "sqlstate", None)


def counted(statement: Any) -> Any:
    """``statement`` (an INSERT whose ``rowcount`` is read) with its row count kept:
    SQLAlchemy keeps it for UPDATE and DELETE only, and psycopg 3 forgets it (-1) when
    SQLAlchemy closes the cursor (psycopg2 keeps it)."""
    return statement.execution_options(preserve_rowcount=True)


def forget_prepared(driver_connection: Any) -> bool:
    """psycopg 3: forget every statement ``driver_connection`` prepared; psycopg sends
    ``DEALLOCATE ALL`` before its next statement and prepares them again as they repeat.
    False if this psycopg keeps no such cache (then nothing was done).

    psycopg has no public call for it: running ``DEALLOCATE ALL`` ourselves is not one, as
    psycopg notices it only the first time it sees the statement since it last cleared
    its cache, and would otherwise go on executing names the server has dropped (26000).
    """
    clear = getattr(getattr(driver_connection, "_prepared", None), "clear", None)
    if clear is None:
        return False
    clear()
    return True


def retries_changed_plan(conn: Any, error: Any) -> bool:
    """Whether the statement that failed with ``error`` on ``conn`` (a SQLAlchemy
    ``Connection``) may run once more: psycopg 3's prepared plan had the old result type
    (0A000) and ``conn`` is in autocommit, outside a transaction block (the failed statement
    did nothing; in a transaction, the caller's ROLLBACK makes psycopg forget it). The
    connection's prepared statements are forgotten first."""
    if conn.dialect.driver != PSYCOPG or sqlstate(error) != PLAN_CHANGED or conn.invalidated:
        return False
    from psycopg.pq import TransactionStatus  # the driver in use: installed

    driver_connection = conn.connection.driver_connection
    if driver_connection.info.transaction_status != TransactionStatus.IDLE:
        return False
    return forget_prepared(driver_connection)
