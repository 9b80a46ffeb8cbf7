"""``PostgresSagaStore``: the saga store's writes on PostgreSQL, one round trip each.

A start and a step's transition are each ONE statement (``one_statement``: data-modifying
CTEs gated on the saga row's compare-and-set), and marking a step started is one
statement that also reads the saga and its steps (``begin_step``); each runs in
autocommit (no BEGIN and COMMIT round trips) as a server-side prepared statement
(``prepared`` with psycopg2; psycopg 3 prepares them itself: ``drivers``), unless
``prepare=False`` (behind a pooler in transaction mode). Scans lock
their rows ``FOR UPDATE SKIP LOCKED`` (``backends.PostgresBackend``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, case, select

from celery_sagas.machine import Decision
from celery_sagas.protocols import (
    CreateResult,
    Expectation,
    GuardRecord,
    NewSaga,
    OutboxMessage,
    SagaRecord,
)
from celery_sagas.store import drivers, one_statement
from celery_sagas.store import guards as guard_rows
from celery_sagas.store.backends import POSTGRES
from celery_sagas.store.engine import autocommit_engine
from celery_sagas.store.prepared import Prepared
from celery_sagas.store.records import STEP_COLUMNS, _fresh_record
from celery_sagas.store.repository import SqlSagaStore
from celery_sagas.store.tables import sagas, steps

# mark a step started and read its saga, one round trip (``begin_step``); the payload
# comes in the first step's row only (decoded once, not once per step)
BEGIN_STEP = guard_rows.begin_step_statement(
    select(
        *(column for column in sagas.c if column.name != "payload"),
        case((steps.c.idx == 0, sagas.c.payload)).label("payload"),
        *STEP_COLUMNS,
    )
    .join(steps, steps.c.saga_id == sagas.c.id)
    .where(sagas.c.id == bindparam("p_saga_id"))
    .order_by(steps.c.idx)
)


class PostgresSagaStore(SqlSagaStore, backend=POSTGRES):
    """The saga store on PostgreSQL: ``postgresql+psycopg2://`` (statements PREPAREd by
    hand) or ``postgresql+psycopg://`` (psycopg 3, which prepares them itself)."""

    def __init__(
        self, url_or_engine: str | Engine, prepare: bool = True, **engine_options: Any
    ) -> None:
        super().__init__(url_or_engine, prepare, **engine_options)
        if isinstance(url_or_engine, str):
            engine_options = drivers.engine_options(url_or_engine, prepare, engine_options)
            self._autocommit = autocommit_engine(url_or_engine, **engine_options)
        else:  # an engine of the caller's: its own pool, set per checkout
            self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # compiled once per store
        self._begin_step = Prepared(BEGIN_STEP, self.engine.dialect, prepare)
        self._begun = guard_rows.Begun(self._begin_step.labels)

    @contextmanager
    def _one_statement(self) -> Iterator[Connection]:
        """A write that is a single statement: autocommit, no BEGIN and COMMIT round trips."""
        with self._unavailable_as_error(), self._autocommit.connect() as conn:
            yield conn

    def _create(
        self, new: NewSaga, decision: Decision, messages: Sequence[OutboxMessage], now: datetime
    ) -> CreateResult:
        with self._one_statement() as conn:
            return self._create_in(conn, new, decision, messages, now, self.prepare)

    def _create_in(
        self,
        conn: Connection,
        new: NewSaga,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
        prepare: bool,
    ) -> CreateResult:
        written = one_statement.create(conn, new, decision, messages, now, prepare)
        if written is None:  # its id or business key exists: nothing was written
            return self._existing(conn, new)
        return CreateResult(_fresh_record(new, decision, now), True, written)

    def write(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
        guard: GuardRecord | None = None,
    ) -> tuple[OutboxMessage, ...]:
        """ONE statement gated on the compare-and-set of the version read
        (``one_statement``), in autocommit; a dead-letter change: one transaction."""
        if not one_statement.fits(decision):
            return super().write(saga, decision, messages, now, guard)
        with self._one_statement() as conn:
            return one_statement.write(conn, saga, decision, messages, now, guard, self.prepare)

    def begin_step(
        self,
        key: str,
        saga_id: str,
        now: datetime,
        expectation: Expectation,
        delivery: str | None = None,
    ) -> tuple[GuardRecord | None, SagaRecord | None]:
        params = {
            "g_key": key,
            "g_now": now,
            "g_delivery": delivery,
            "p_saga_id": saga_id,
            "g_step": expectation.step,
            "g_token": expectation.token,
            "g_role": expectation.role,
            "g_definition": expectation.definition,
        }
        with self._one_statement() as conn:
            rows = self._begin_step.raw(conn, params)
        if not rows:  # no such saga: nothing written
            return None, None
        return self._begun.answer(rows)

    def begin_guard(
        self, key: str, now: datetime, delivery: str | None = None
    ) -> GuardRecord | None:
        with self._one_statement() as conn:
            return guard_rows.begin_guard(conn, self._mark_started, key, now, delivery)
