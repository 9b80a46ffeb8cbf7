"""The scanner's claims: due sagas, sagas waiting for a free slot, and sagas stuck for too
long, taken with the backend's ``skip_locked`` (PostgreSQL: ``FOR UPDATE SKIP LOCKED``), so
two scanners never take the same saga; ``SqlClaim`` writes decisions in the claiming transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, select, update

from celery_sagas import row_filters
from celery_sagas.machine import Decision
from celery_sagas.protocols import STARTED, OutboxMessage, SagaRecord, current_execution_key
from celery_sagas.row_changes import with_current_start
from celery_sagas.store.backends import Backend
from celery_sagas.store.filters import where
from celery_sagas.store.records import _saga_record
from celery_sagas.store.tables import guards, sagas, steps

if TYPE_CHECKING:
    from celery_sagas.store.repository import SqlSagaStore


def claim_due(
    conn: Connection, now: datetime, limit: int, backend: Backend
) -> tuple[SagaRecord, ...]:
    rows = conn.execute(
        backend.skip_locked(
            select(sagas)
            .where(*where(sagas, row_filters.due(now)))
            .order_by(sagas.c.due_at)
            .limit(limit)
        )
    ).all()
    return _records(conn, rows)


def claim_waiting(
    conn: Connection, name: str, max_concurrent: int, backend: Backend
) -> tuple[SagaRecord, ...]:
    backend.one_at_a_time(conn, _lock_key(name))  # one admitter per saga type at a time
    running = conn.execute(
        select(func.count()).select_from(sagas).where(*where(sagas, row_filters.running(name)))
    ).scalar_one()
    free = max(0, max_concurrent - running)
    rows = (
        conn.execute(
            select(sagas)
            .where(*where(sagas, row_filters.waiting(name)))
            .order_by(sagas.c.created_at, sagas.c.id)
            .limit(free)
        ).all()
        if free
        else []
    )
    return _records(conn, rows)


def waiting_names(conn: Connection) -> tuple[str, ...]:
    names = conn.execute(
        select(sagas.c.name).where(*where(sagas, row_filters.waiting())).distinct()
    ).scalars()
    return tuple(names)


def report_stuck(
    conn: Connection, older_than: datetime, now: datetime, limit: int, backend: Backend
) -> tuple[SagaRecord, ...]:
    rows = conn.execute(
        backend.skip_locked(
            select(sagas)
            .where(*where(sagas, row_filters.stuck(older_than)))
            .order_by(sagas.c.created_at)
            .limit(limit)
        )
    ).all()
    if rows:
        conn.execute(
            update(sagas).where(sagas.c.id.in_([r.id for r in rows])).values(stuck_reported_at=now)
        )
    return tuple(_saga_record(r) for r in rows)


def _records(conn: Connection, rows: Sequence[Any]) -> tuple[SagaRecord, ...]:
    if not rows:
        return ()
    by_saga: dict[str, list[Any]] = {}
    step_rows = conn.execute(
        select(steps)
        .where(steps.c.saga_id.in_([r.id for r in rows]))
        .order_by(steps.c.saga_id, steps.c.idx)
    )
    for step_row in step_rows:
        by_saga.setdefault(step_row.saga_id, []).append(step_row)
    records = tuple(_saga_record(r, by_saga.get(r.id, [])) for r in rows)
    return _with_started_flags(conn, records)


def _with_started_flags(
    conn: Connection, records: tuple[SagaRecord, ...]
) -> tuple[SagaRecord, ...]:
    """Each record with its current step's ``started`` flag (``row_changes.with_current_start``),
    from the ``started`` guards of their current executions."""
    keys = {r.saga_id: current_execution_key(r) for r in records}
    in_progress = select(guards.c.key, guards.c.recorded_at).where(
        guards.c.key.in_(list(keys.values())), guards.c.outcome == STARTED
    )
    began = {key: at for key, at in conn.execute(in_progress).all()}
    return tuple(with_current_start(r, began.get(keys[r.saga_id])) for r in records)


class SqlClaim:
    """Sagas locked by a scan; ``commit`` writes a decision in the claim's transaction."""

    def __init__(
        self, store: SqlSagaStore, conn: Connection, records: tuple[SagaRecord, ...]
    ) -> None:
        self._store = store
        self._conn = conn
        self.records = records

    def commit(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        return self._store._commit_in(self._conn, saga, decision, messages, now)


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a saga type."""
    digest = hashlib.sha256(f"celery_sagas:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
