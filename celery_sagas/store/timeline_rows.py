"""The rows of a choreographed saga's timeline (``saga_event``, ``saga_reaction``, the
transition log) and its saga row's state, written in the caller's transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, update

from celery_sagas.choreography import OutgoingEvent, PublishedEvent
from celery_sagas.machine import TERMINAL_STATES, SagaState
from celery_sagas.store.backends import Backend
from celery_sagas.store.drivers import counted
from celery_sagas.store.tables import events, reactions, sagas, transitions


@dataclass(frozen=True)
class Consumed:
    """A handler's reaction to an event: ``ok`` or ``business``."""

    event_id: str
    handler: str
    event_name: str
    outcome: str


def event_columns(event: OutgoingEvent) -> dict[str, Any]:
    """An event's columns in ``saga_event`` and in a service's ``service_outbox``."""
    return {
        "event_id": event.event_id,
        "saga_id": event.saga_id,
        "name": event.name,
        "service": event.service,
        "handler": event.handler,
        "caused_by": event.caused_by,
        "payload": dict(event.data),
    }


def published(row: Any) -> PublishedEvent:
    return PublishedEvent(
        event_id=row.event_id,
        saga_id=row.saga_id,
        name=row.name,
        service=row.service,
        data=row.payload,
        published_at=row.published_at,
        handler=row.handler,
        caused_by=row.caused_by,
    )


def add_event(
    conn: Connection, backend: Backend, event: OutgoingEvent, now: datetime, sent: bool
) -> bool:
    return bool(
        conn.execute(
            counted(
                backend.insert(events)
                .values(**event_columns(event), published_at=now, sent_at=now if sent else None)
                .on_conflict_do_nothing()
            )
        ).rowcount
    )


def add_reaction(
    conn: Connection, backend: Backend, saga_id: str, consumed: Consumed, now: datetime
) -> bool:
    return bool(
        conn.execute(
            counted(
                backend.insert(reactions)
                .values(
                    event_id=consumed.event_id,
                    handler=consumed.handler,
                    saga_id=saga_id,
                    outcome=consumed.outcome,
                    at=now,
                )
                .on_conflict_do_nothing()
            )
        ).rowcount
    )


def log(
    conn: Connection,
    saga_id: str,
    now: datetime,
    event: str,
    old: SagaState | str,
    new: SagaState | str,
    reason: str,
    actor: str,
) -> None:
    conn.execute(
        transitions.insert().values(
            saga_id=saga_id,
            at=now,
            step=event,
            old=str(old),
            new=str(new),
            reason=reason,
            actor=actor[:200],
        )
    )


def update_state(
    conn: Connection,
    saga_id: str,
    old: SagaState,
    new: SagaState,
    now: datetime,
    published: Sequence[OutgoingEvent],
) -> None:
    values: dict[str, Any] = {
        "state": new.value,
        "updated_at": now,
        "version": sagas.c.version + 1,
    }
    if new in TERMINAL_STATES and old not in TERMINAL_STATES:
        values["finished_at"] = now
        if new == SagaState.FAILED:
            reasons = [e.data.get("reason") for e in published if e.data.get("reason")]
            values["reason"] = str(reasons[-1]) if reasons else published[-1].name
    conn.execute(update(sagas).where(sagas.c.id == saga_id).values(**values))


def published_by(event: OutgoingEvent) -> str:
    by = event.handler or event.service
    return f"published by {by}"


def as_published(event: OutgoingEvent, now: datetime) -> PublishedEvent:
    return PublishedEvent(
        event.event_id,
        event.saga_id,
        event.name,
        event.service,
        event.data,
        now,
        event.handler,
        event.caused_by,
    )
