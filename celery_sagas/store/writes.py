"""Writing a decision in the caller's transaction: the compare-and-set on the saga row,
then the step changes, the transition log, the dead-letter change and the outbox messages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, delete, update

from celery_sagas.errors import ConcurrentUpdateError
from celery_sagas.machine import TERMINAL_STATES, Decision
from celery_sagas.protocols import NewSaga, OutboxMessage, SagaRecord, step_values
from celery_sagas.store import dead_letters as dead_letter_rows
from celery_sagas.store.tables import dead_letters, outbox, sagas, steps, transitions


def new_saga_values(new: NewSaga, decision: Decision, now: datetime) -> dict[str, Any]:
    """The columns of a new saga row."""
    assert decision.state is not None
    return {
        "id": new.saga_id,
        "name": new.name,
        "business_key": new.business_key,
        "payload": dict(new.payload),
        "payload_hash": new.payload_hash,
        "state": decision.state.value,
        "current_step": decision.current_step,
        "token": decision.token,
        "version": 1,
        "created_at": now,
        "updated_at": now,
        "deadline_at": new.deadline_at,
        "due_at": decision.due_at,
        "admitted": decision.admitted,
        "definition": new.definition,
    }


def saga_values(saga: SagaRecord, decision: Decision, now: datetime) -> dict[str, Any]:
    """The saga row's columns after ``decision`` (its version one up)."""
    assert decision.accepted and decision.state is not None
    values: dict[str, Any] = {
        "state": decision.state.value,
        "current_step": decision.current_step,
        "token": decision.token,
        "version": saga.version + 1,
        "updated_at": now,
        "due_at": decision.due_at,
    }
    if decision.reason is not None:
        values["reason"] = decision.reason
    if decision.state in TERMINAL_STATES:
        values["finished_at"] = now
    if decision.admitted:
        values["admitted"] = True
    return values


def update_saga(conn: Connection, saga: SagaRecord, decision: Decision, now: datetime) -> None:
    """Move the saga row to ``decision``; ``ConcurrentUpdateError`` if it changed since
    ``saga.version`` was read."""
    changed = conn.execute(
        update(sagas)
        .where(sagas.c.id == saga.saga_id, sagas.c.version == saga.version)
        .values(**saga_values(saga, decision, now))
    ).rowcount
    if changed != 1:
        raise ConcurrentUpdateError(
            f"saga {saga.saga_id} changed since version {saga.version}",
            saga_id=saga.saga_id,
        )


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


def write_decision(
    conn: Connection,
    insert: Callable[[Table], Any],
    saga_id: str,
    decision: Decision,
    messages: Sequence[OutboxMessage],
    now: datetime,
    fresh: bool = False,
) -> tuple[OutboxMessage, ...]:
    for change in decision.step_changes:
        conn.execute(
            update(steps)
            .where(steps.c.saga_id == saga_id, steps.c.idx == change.index)
            .values(**step_values(change, now))
        )
    if decision.transitions:
        conn.execute(
            transitions.insert(),
            [
                {
                    "saga_id": saga_id,
                    "at": now,
                    "step": t.step,
                    "old": t.old,
                    "new": t.new,
                    "reason": t.reason,
                    "actor": decision.actor or "coordinator",
                }
                for t in decision.transitions
            ],
        )
    if decision.dead_letter is not None:
        dead_letter_rows.write_change(
            conn, insert(dead_letters), saga_id, decision.dead_letter, now
        )
    if not fresh:
        # The saga moved on, so the messages that moved it were delivered: the relay
        # must not republish them.
        conn.execute(
            update(outbox)
            .where(outbox.c.saga_id == saga_id, outbox.c.sent_at.is_(None))
            .values(sent_at=now)
        )
    written = []
    for message in messages:
        new_id = conn.execute(
            outbox.insert()
            .values(
                saga_id=saga_id,
                body=dict(message.body),
                created_at=now,
                key=message.body.get("key"),
            )
            .returning(outbox.c.id)
        ).scalar_one()
        written.append(OutboxMessage(saga_id, message.body, id=new_id, created_at=now))
    return tuple(written)
