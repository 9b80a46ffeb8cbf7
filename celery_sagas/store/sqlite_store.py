"""``SqliteSagaStore``: the saga store's writes on SQLite, each an ordinary transaction.

SQLite has one writer at a time (write transactions begin IMMEDIATE: see ``engine``), so
a write is a few plain statements in one transaction and nothing is locked row by row
(``backends.SqliteBackend``); a step is marked started after its saga is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection

from celery_sagas.machine import Decision
from celery_sagas.protocols import (
    CreateResult,
    Expectation,
    GuardRecord,
    NewSaga,
    OutboxMessage,
    SagaRecord,
    expects,
)
from celery_sagas.row_changes import new_saga_columns
from celery_sagas.store import guards as guard_rows
from celery_sagas.store import writes
from celery_sagas.store.backends import SQLITE
from celery_sagas.store.records import _fresh_record
from celery_sagas.store.repository import SqlSagaStore
from celery_sagas.store.tables import sagas


class SqliteSagaStore(SqlSagaStore, backend=SQLITE):
    """The saga store on SQLite (``sqlite:///path``); ``prepare`` does not apply."""

    def _create(
        self, new: NewSaga, decision: Decision, messages: Sequence[OutboxMessage], now: datetime
    ) -> CreateResult:
        with self._connect() as conn:
            return self._create_in(conn, new, decision, messages, now, prepare=False)

    def _create_in(
        self,
        conn: Connection,
        new: NewSaga,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
        prepare: bool,
    ) -> CreateResult:
        inserted = conn.execute(
            SQLITE.insert(sagas)
            .values(**new_saga_columns(new, decision, now))
            # any conflict: the business key, or the same start delivered twice (its
            # task id is the saga id)
            .on_conflict_do_nothing()
        )
        if inserted.rowcount == 0:
            return self._existing(conn, new)
        writes.insert_steps(conn, new, decision, now)
        written = writes.write_rows(
            conn, SQLITE.insert, new.saga_id, decision, messages, now, fresh=True
        )
        return CreateResult(_fresh_record(new, decision, now), True, written)

    def begin_step(
        self,
        key: str,
        saga_id: str,
        now: datetime,
        expectation: Expectation,
        delivery: str | None = None,
    ) -> tuple[GuardRecord | None, SagaRecord | None]:
        """The saga read, then ``key`` marked if the saga expects the step."""
        record = self.load(saga_id)
        if not expects(record, expectation):
            return None, record
        return self.begin_guard(key, now, delivery), record

    def begin_guard(
        self, key: str, now: datetime, delivery: str | None = None
    ) -> GuardRecord | None:
        with self._connect() as conn:
            return guard_rows.begin_guard(conn, self._mark_started, key, now, delivery)
