"""PostgreSQL server-side prepared statements for the hot path's writes.

psycopg2 sends every statement as text, so PostgreSQL parses and plans it every time; for
the transition statement (``one_statement``) planning costs about as much as running it.
``Prepared`` compiles a SQLAlchemy statement once, ``PREPARE``s it once per database
connection (remembered in the pool's per-connection ``info``) and then sends only
``EXECUTE name(values)``. Values go through the same bind processors SQLAlchemy applies
(JSON serialised, UTC datetimes), and ``rows`` applies the result processors of the
statement's columns (UTC datetimes).
"""

from __future__ import annotations

import hashlib
import re
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, CursorResult, Dialect
from sqlalchemy.exc import DBAPIError

UNKNOWN_NAME = "26000"  # the session lost the PREPAREd name (a pooler discarded it)
PLAN_CHANGED = "0A000"  # a schema change invalidated the prepared plan's result type
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


class Prepared:
    """A statement prepared once per connection and executed by name (``enabled=False``:
    executed as an ordinary statement, e.g. behind a pooler in transaction mode, where a
    PREPAREd name does not follow the client from one server connection to the next)."""

    def __init__(self, statement: Any, dialect: Dialect, enabled: bool = True) -> None:
        self.statement = statement
        self.enabled = enabled
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
        self.names: list[str] = []
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

    def rows(self, conn: Connection, params: dict[str, Any]) -> list[Any]:
        """The result rows (attribute access by column label), result-processed."""
        if not self.enabled:
            return list(conn.execute(self.statement, params).all())
        result = self.execute(conn, params)
        names = list(result.keys())
        processors = [self.results.get(name) for name in names]
        return [
            SimpleNamespace(
                **{
                    name: value if processor is None or value is None else processor(value)
                    for name, value, processor in zip(names, row, processors, strict=True)
                }
            )
            for row in result
        ]

    def execute(self, conn: Connection, params: dict[str, Any]) -> CursorResult[Any]:
        """Run it on ``conn`` (PREPAREd there first if needed; again if the session lost
        it, e.g. behind a pooler that discards session state, or a migration changed a
        table under it). ``conn`` must be in autocommit: a failed EXECUTE is retried."""
        if not self.enabled:
            return conn.execute(self.statement, params)
        prepared: set[str] = conn.connection.info.setdefault("celery_sagas_prepared", set())
        if self.name not in prepared:
            conn.exec_driver_sql(self.prepare)
            prepared.add(self.name)
        try:
            return conn.exec_driver_sql(self.execute_sql, self.values(params))
        except DBAPIError as exc:
            code = getattr(exc.orig, "pgcode", None)
            if code not in (UNKNOWN_NAME, PLAN_CHANGED):
                raise
            if code == PLAN_CHANGED:
                conn.exec_driver_sql(f"DEALLOCATE {self.name}")
            conn.exec_driver_sql(self.prepare)
            return conn.exec_driver_sql(self.execute_sql, self.values(params))
