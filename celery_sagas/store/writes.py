"""Writing a decision in the caller's transaction: the compare-and-set on the saga row,
then the step changes, the transition log, the dead-letter change and the outbox messages,
as statements of the values ``celery_sagas.row_changes`` gives (the rules live there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, delete, update

from celery_sagas.machine import Decision
from celery_sagas.protocols import NewSaga, OutboxMessage, SagaRecord
from celery_sagas.row_changes import (
    changed_since,
    consumes_unsent,
    new_step_columns,
    outbox_columns,
    saga_columns,
    step_columns,
    transition_rows,
    written_messages,
)
from celery_sagas.store import dead_letters as dead_letter_rows
from celery_sagas.store.tables import dead_letters, outbox, sagas, steps, transitions


def update_saga(conn: Connection, saga: SagaRecord, decision: Decision, now: datetime) -> None:
    """Move the saga row to ``decision``; ``ConcurrentUpdateError`` if it changed since
    ``saga.version`` was read."""
    changed = conn.execute(
        update(sagas)
        .where(sagas.c.id == saga.saga_id, sagas.c.version == saga.version)
        .values(**saga_columns(saga, decision, now))
    ).rowcount
    if changed != 1:
        raise changed_since(saga)


def replace_steps(conn: Connection, saga: SagaRecord) -> None:
    """The saga's definition and step rows as ``saga`` has them (a move onto another
    version of its definition); the version compare-and-set that follows guards it."""
    conn.execute(
        update(sagas)
        .where(sagas.c.id == saga.saga_id, sagas.c.version == saga.version)
        .values(definition=saga.definition)
    )
    conn.execute(delete(steps).where(steps.c.saga_id == saga.saga_id))
    conn.execute(
        steps.insert(),
        [
            {
                "saga_id": saga.saga_id,
                "idx": s.index,
                "name": s.name,
                "status": s.status.value,
                "attempts": s.attempts,
                "compensation_attempts": s.compensation_attempts,
                "result": s.result,
                "error": s.error,
                "error_kind": s.error_kind.value if s.error_kind else None,
                "started_at": s.started_at,
                "finished_at": s.finished_at,
                "deadline_at": s.deadline_at,
                "redispatch_at": s.redispatch_at,
                "dispatches": s.dispatches,
            }
            for s in saga.steps
        ],
    )


def insert_steps(conn: Connection, new: NewSaga, decision: Decision, now: datetime) -> None:
    """The step rows of a new saga (``row_changes.new_step_columns``): one INSERT per set
    of columns written (the steps still pending share one)."""
    rows: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for _, columns in new_step_columns(new, decision, now):
        rows.setdefault(tuple(columns), []).append({"saga_id": new.saga_id, **columns})
    for same_columns in rows.values():
        conn.execute(steps.insert(), same_columns)


def write_decision(
    conn: Connection,
    insert: Callable[[Table], Any],
    saga_id: str,
    decision: Decision,
    messages: Sequence[OutboxMessage],
    now: datetime,
) -> tuple[OutboxMessage, ...]:
    """``decision``'s step changes on a saga that exists, then ``write_rows``."""
    for index, values in step_columns(decision.step_changes, now).items():
        conn.execute(
            update(steps).where(steps.c.saga_id == saga_id, steps.c.idx == index).values(**values)
        )
    return write_rows(conn, insert, saga_id, decision, messages, now)


def write_rows(
    conn: Connection,
    insert: Callable[[Table], Any],
    saga_id: str,
    decision: Decision,
    messages: Sequence[OutboxMessage],
    now: datetime,
    fresh: bool = False,
) -> tuple[OutboxMessage, ...]:
    """The rows of ``decision`` other than the saga's and its steps': the transition log,
    the dead-letter change, the consumed (none for a ``fresh`` saga) and the new outbox
    rows."""
    logged = transition_rows(saga_id, decision, now)
    if logged:
        conn.execute(transitions.insert(), [vars(row) for row in logged])
    if decision.dead_letter is not None:
        dead_letter_rows.write_change(
            conn, insert(dead_letters), saga_id, decision.dead_letter, now
        )
    if consumes_unsent(fresh):
        conn.execute(
            update(outbox)
            .where(outbox.c.saga_id == saga_id, outbox.c.sent_at.is_(None))
            .values(sent_at=now)
        )
    ids = [
        conn.execute(
            outbox.insert().values(**outbox_columns(saga_id, message, now)).returning(outbox.c.id)
        ).scalar_one()
        for message in messages
    ]
    return written_messages(saga_id, messages, ids, now)
