"""The dead-letter table: compensations that exhausted their retries, and what operators
(or the DLQ recovery worker) did about them. Written in the saga's own transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, delete, select, update

from celery_sagas.definition import idempotency_key
from celery_sagas.machine import DeadLetterChange, Role
from celery_sagas.machine.dead_letters import (
    ALLOWED_FROM,
    OPEN_DEAD_LETTER,
    DeadLetterStatus,
    moved_values,
)
from celery_sagas.protocols import STARTED, AttemptRecord, DeadLetterRecord
from celery_sagas.row_changes import (
    auto_retry_columns,
    buried_columns,
    forgets_started_marker,
    new_entry_columns,
)
from celery_sagas.store.tables import attempts, dead_letters, guards, sagas, steps


def write_change(
    conn: Connection, insert: Any, saga_id: str, change: DeadLetterChange, now: datetime
) -> None:
    if change.status == "dead":
        _bury(conn, insert, saga_id, change, now)
        return
    values = moved_values(change.status, now, change.resolution)
    changed = conn.execute(
        update(dead_letters)
        .where(
            dead_letters.c.saga_id == saga_id,
            dead_letters.c.step == change.step,
            dead_letters.c.status.in_(ALLOWED_FROM[change.status]),
        )
        .values(**values)
    ).rowcount
    if changed and forgets_started_marker(change.status):
        _forget_started_marker(conn, saga_id, change.step)


def _forget_started_marker(conn: Connection, saga_id: str, step: int) -> None:
    name = conn.execute(
        select(steps.c.name).where(steps.c.saga_id == saga_id, steps.c.idx == step)
    ).scalar_one()
    key = idempotency_key(saga_id, name, Role.COMPENSATION)
    conn.execute(delete(guards).where(guards.c.key == key, guards.c.outcome == STARTED))


def _bury(
    conn: Connection, insert: Any, saga_id: str, change: DeadLetterChange, now: datetime
) -> None:
    """Create the entry, or make it dead again (a retried compensation failed again)."""
    names = conn.execute(
        select(sagas.c.name, steps.c.name.label("step_name"))
        .join(steps, steps.c.saga_id == sagas.c.id)
        .where(sagas.c.id == saga_id, steps.c.idx == change.step)
    ).one()
    statement = insert.values(
        **new_entry_columns(saga_id, names.name, names.step_name, change, now)
    )
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=["saga_id", "step"],
            set_={**buried_columns(change, now), "deaths": dead_letters.c.deaths + 1},
        )
    )


def record(row: Row[Any]) -> DeadLetterRecord:
    return DeadLetterRecord(
        id=row.id,
        saga_id=row.saga_id,
        saga_name=row.saga_name,
        step=row.step,
        step_name=row.step_name,
        task_name=row.task_name,
        status=row.status,
        attempts=row.attempts,
        deaths=row.deaths,
        error=row.error,
        traceback=row.traceback,
        payload=row.payload,
        created_at=row.created_at,
        updated_at=row.updated_at,
        resolved_at=row.resolved_at,
        resolution=row.resolution,
        auto_retries=row.auto_retries,
        next_auto_retry_at=row.next_auto_retry_at,
    )


def query(saga_id: str | None, status: str | None, limit: int) -> Any:
    statement = select(dead_letters).order_by(dead_letters.c.id).limit(limit)
    if saga_id is not None:
        statement = statement.where(dead_letters.c.saga_id == saga_id)
    if status == "open":
        statement = statement.where(dead_letters.c.status.in_(OPEN_DEAD_LETTER))
    elif status not in (None, "all"):
        statement = statement.where(dead_letters.c.status == status)
    return statement


def by_step(saga_id: str, step: int) -> Any:
    return select(dead_letters).where(
        dead_letters.c.saga_id == saga_id, dead_letters.c.step == step
    )


def claim_auto_retry(conn: Connection, entry: DeadLetterRecord, next_at: datetime) -> bool:
    """Count one automatic retry (``row_changes.auto_retry_claimable``, in SQL)."""
    changed = conn.execute(
        update(dead_letters)
        .where(
            dead_letters.c.id == entry.id,
            dead_letters.c.auto_retries == entry.auto_retries,
            dead_letters.c.status == DeadLetterStatus.DEAD.value,
        )
        .values(**auto_retry_columns(entry, next_at))
    ).rowcount
    return bool(changed == 1)


def attempt_rows(conn: Connection, key: str) -> tuple[AttemptRecord, ...]:
    rows = conn.execute(
        select(attempts).where(attempts.c.key == key).order_by(attempts.c.attempt, attempts.c.id)
    )
    return tuple(AttemptRecord(r.saga_id, r.key, r.attempt, r.at, r.error) for r in rows)
