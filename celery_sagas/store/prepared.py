"""PostgreSQL server-side prepared statements for the hot path's writes.

psycopg2 sends every statement as text, so PostgreSQL parses and plans it every time; for
the transition statement (``one_statement``) planning costs about as much as running it.
(psycopg 3 prepares repeated statements itself and cannot send a textual ``EXECUTE`` with
values: there ``Prepared`` runs the plain statement, once more if a migration changed its
result type under psycopg's plan; see ``drivers``.)
``Prepared`` compiles a SQLAlchemy statement once, ``PREPARE``s it once per database
connection (remembered in the pool's per-connection ``info``) and then sends only
``EXECUTE name(values)``. Values go through the same bind processors SQLAlchemy applies
(JSON serialised, UTC datetimes), and ``rows`` applies the result processors of the
statement's columns (UTC datetimes).
"""

from __future__ import annotations

import hashlib
import re
from collections import namedtuple
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Dialect
from sqlalchemy.exc import DBAPIError

from celery_sagas.store.drivers import (
    PLAN_CHANGED,
    prepares_by_hand,
    retries_changed_plan,
    sqlstate,
)

UNKNOWN_NAME = "26000"  # the session lost the PREPAREd name (a pooler discarded it)
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


class Prepared:
    """A statement prepared once per connection and executed by name (``enabled=False``:
    executed as an ordinary statement, e.g. behind a pooler in transaction mode, where a
    PREPAREd name does not follow the client from one server connection to the next; so
    too on a driver other than psycopg2: ``drivers.prepares_by_hand``)."""

    def __init__(self, statement: Any, dialect: Dialect, enabled: bool = True) -> None:
        self.statement = statement
        self.enabled = prepares_by_hand(dialect, enabled)
        compiled = statement.compile(dialect=dialect)
        self.results = {
            column.key: processor
            for column in statement.selected_columns
            if (processor := dialect.type_descriptor(column.type).result_processor(dialect, None))
            is not None
        }
        self.defaults = {name: bind.value for name, bind in compiled.binds.items()}
        self.processors = {
            name: processor
            for name, bind in compiled.binds.items()
            if (processor := dialect.type_descriptor(bind.type).bind_processor(dialect)) is not None
        }
        self.labels = tuple(column.key for column in statement.selected_columns)
        self.names: list[str] = []
        self._row_types: dict[tuple[str, ...], Any] = {}
        text = _PLACEHOLDER.sub(self._positional, compiled.string)
        self.name = "cs_" + hashlib.sha1(text.encode()).hexdigest()[:20]
        self.prepare = f"PREPARE {self.name} AS {text}"
        self.execute_sql = (
            f"EXECUTE {self.name}(" + ", ".join(f"%({name})s" for name in self.names) + ")"
        )

    def _positional(self, match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in self.names:
            self.names.append(name)
        return f"${self.names.index(name) + 1}"

    def values(self, params: dict[str, Any]) -> dict[str, Any]:
        values = {name: params.get(name, self.defaults.get(name)) for name in self.names}
        for name, processor in self.processors.items():
            if name in values:
                values[name] = processor(values[name])
        return values

    def raw(self, conn: Connection, params: dict[str, Any]) -> Sequence[Sequence[Any]]:
        """The result rows as the driver returns them, columns in ``labels`` order, not
        result-processed (datetimes in the session's time zone; JSON decoded) — for a
        caller that reads them by position (SQLAlchemy's rows when not prepared)."""
        if not self.enabled:
            return self._execute_plain(conn, params)
        return self._execute_prepared(conn, params)[1]

    def rows(self, conn: Connection, params: dict[str, Any]) -> list[Any]:
        """The result rows (attribute access by column label, and by position),
        result-processed."""
        if not self.enabled:
            return list(self._execute_plain(conn, params))
        names, raw = self._execute_prepared(conn, params)
        row_type: Any = self._row_types.get(names)
        if row_type is None:
            row_type = self._row_types[names] = namedtuple("PreparedRow", names, rename=True)
        processors = [self.results.get(name) for name in names]
        if not any(processors):
            return [row_type._make(row) for row in raw]
        return [
            row_type._make(
                value if processor is None or value is None else processor(value)
                for value, processor in zip(row, processors, strict=True)
            )
            for row in raw
        ]

    def _execute_plain(self, conn: Connection, params: dict[str, Any]) -> Sequence[Any]:
        """The statement as it is (the driver may prepare it: psycopg 3), run once more
        when psycopg 3's plan of it predates a migration that changed its result type and
        ``conn`` is in autocommit (``drivers.retries_changed_plan``)."""
        try:
            return conn.execute(self.statement, params).all()
        except DBAPIError as exc:
            if not retries_changed_plan(conn, exc.orig):
                raise
        return conn.execute(self.statement, params).all()

    def _execute_prepared(
        self, conn: Connection, params: dict[str, Any]
    ) -> tuple[tuple[str, ...], Sequence[Any]]:
        """``EXECUTE`` on ``conn`` (``PREPARE``d there first if needed; again if the session
        lost it, e.g. behind a pooler that discards session state, or a migration changed
        a table under it). ``conn`` must be in autocommit: a failed EXECUTE is retried.

        The column names and the raw rows: the statement runs on the driver's cursor,
        without SQLAlchemy's per-call execution context and result metadata (which a
        textual ``EXECUTE`` rebuilds on every call); driver errors go through the
        connection's own handling (wrapped as ``DBAPIError``, a lost connection
        invalidated)."""
        prepared: set[str] = conn.connection.info.setdefault("celery_sagas_prepared", set())
        if self.name not in prepared:
            self._on_cursor(conn, self.prepare, None)
            prepared.add(self.name)
        try:
            return self._on_cursor(conn, self.execute_sql, self.values(params))
        except DBAPIError as exc:
            code = sqlstate(exc.orig)
            if code not in (UNKNOWN_NAME, PLAN_CHANGED):
                raise
            if code == PLAN_CHANGED:
                self._on_cursor(conn, f"DEALLOCATE {self.name}", None)
            self._on_cursor(conn, self.prepare, None)
            return self._on_cursor(conn, self.execute_sql, self.values(params))

    @staticmethod
    def _on_cursor(
        conn: Connection, sql: str, values: dict[str, Any] | None
    ) -> tuple[tuple[str, ...], Sequence[Any]]:
        cursor = conn.connection.cursor()
        try:
            cursor.execute(sql, values)
            if cursor.description is None:
                return (), []
            names = tuple(column[0] for column in cursor.description)
            return names, cursor.fetchall()
        except conn.dialect.loaded_dbapi.Error as exc:
            conn._handle_dbapi_exception(exc, sql, values, cursor, None)  # raises
        finally:
            cursor.close()
