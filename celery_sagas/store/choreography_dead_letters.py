"""Dead letters of choreography handlers, in the same ``saga_dead_letter`` table as dead
compensations (so ``celery-sagas dlq`` lists and drains both). A handler's entry has a
negative ``step`` (``choreography.dead_letter_step``), ``step_name`` the handler and a
payload naming the event to re-deliver; the timeline gets a row for each change."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from celery_sagas.choreography import automatic_actor
from celery_sagas.machine.dead_letters import ALLOWED_FROM, moved_values
from celery_sagas.store.choreography import ChoreographyStore
from celery_sagas.store.tables import dead_letters, sagas, transitions


def _note(conn: Connection, saga_id: str, now: datetime, step: str, note: str, actor: str) -> None:
    state = conn.execute(select(sagas.c.state).where(sagas.c.id == saga_id)).scalar_one()
    conn.execute(
        transitions.insert().values(
            saga_id=saga_id,
            at=now,
            step=step,
            old=state,
            new=state,
            reason=note,
            actor=actor[:200],
        )
    )


def bury(
    store: ChoreographyStore,
    *,
    saga_id: str,
    saga_name: str,
    step: int,
    handler: str,
    task_name: str,
    event: str,
    payload: dict[str, Any],
    attempts: int,
    error: str,
    traceback: str,
    now: datetime,
) -> None:
    """Create the entry, or make it dead again (a re-delivered event failed again)."""
    values = {
        "status": "dead",
        "attempts": attempts,
        "error": error,
        "traceback": traceback,
        "updated_at": now,
        "resolved_at": None,
    }
    with store.engine.begin() as conn:
        statement = store.backend.insert(dead_letters).values(
            saga_id=saga_id,
            saga_name=saga_name,
            step=step,
            step_name=handler,
            task_name=task_name,
            payload=payload,
            created_at=now,
            deaths=1,
            **values,
        )
        conn.execute(
            statement.on_conflict_do_update(
                index_elements=["saga_id", "step"],
                set_={**values, "deaths": dead_letters.c.deaths + 1},
            )
        )
        _note(
            conn,
            saga_id,
            now,
            event,
            f"{handler} dead-lettered after {attempts} attempt(s): {error}",
            automatic_actor(handler),
        )


def move(
    store: ChoreographyStore,
    entry_id: int,
    status: str,
    now: datetime,
    actor: str,
    resolution: str | None = None,
) -> bool:
    """Move an entry to ``status`` if its current status allows it (compare-and-set):
    dead -> retrying | discarded, retrying -> resolved."""
    values = moved_values(status, now, resolution)
    with store.engine.begin() as conn:
        row = conn.execute(
            select(dead_letters.c.saga_id, dead_letters.c.step_name, dead_letters.c.payload).where(
                dead_letters.c.id == entry_id
            )
        ).one_or_none()
        if row is None:
            return False
        changed = conn.execute(
            update(dead_letters)
            .where(
                dead_letters.c.id == entry_id,
                dead_letters.c.status.in_(ALLOWED_FROM[status]),
            )
            .values(**values)
        ).rowcount
        if changed:
            note = f"dead letter {entry_id} of {row.step_name}: {status}"
            if resolution:
                note += f" ({resolution})"
            _note(conn, row.saga_id, now, str(row.payload.get("event", "")), note, actor)
    return bool(changed)


def entry_id_for(store: ChoreographyStore, saga_id: str, step: int) -> int | None:
    with store.engine.connect() as conn:
        found = conn.execute(
            select(dead_letters.c.id).where(
                dead_letters.c.saga_id == saga_id, dead_letters.c.step == step
            )
        ).scalar_one_or_none()
    return None if found is None else int(found)
