"""Choreographed sagas in the saga tables: the ``saga`` row (state by
``choreography.track``), the event timeline (``saga_event``, ``saga_reaction``) and the
transition log rows ``celery-sagas show`` prints. Every change is one transaction on the
saga row (locked), idempotent per event and per (event, handler).

A choreographed saga has no step rows and no ``due_at``: the orchestration scanner never
claims it; its deadline is ``deadline_at``, which ``fail_overdue`` enforces.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, exists, select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from celery_sagas.choreography import (
    LIBRARY_SERVICE,
    Choreography,
    OutgoingEvent,
    PublishedEvent,
    deadline_event_id,
    track,
)
from celery_sagas.choreography import (
    automatic_actor as auto,
)
from celery_sagas.errors import StoreUnavailableError
from celery_sagas.machine import SagaState
from celery_sagas.settings import redact_url
from celery_sagas.store import timeline_rows as timeline
from celery_sagas.store.backends import backend_named
from celery_sagas.store.drivers import counted
from celery_sagas.store.engine import engine_of
from celery_sagas.store.tables import events, reactions, sagas
from celery_sagas.store.timeline_rows import Consumed


@dataclass(frozen=True)
class NewChoreographedSaga:
    saga_id: str
    name: str
    business_key: str
    payload: dict[str, Any]
    payload_hash: str
    deadline_at: datetime | None


class ChoreographyStore:
    """The saga database's side of choreography."""

    def __init__(self, url_or_engine: str | Engine, prepare: bool = True) -> None:
        """``prepare=False``: no server-side prepared statements (psycopg 3 behind a
        pooler in transaction mode; psycopg2 prepares nothing here anyway)."""
        self.engine = engine_of(url_or_engine, prepare)
        self.backend = backend_named(self.engine.dialect.name)

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailableError(
                f"cannot reach the saga database {redact_url(str(self.engine.url))}: {exc.orig}"
            ) from exc

    # -- start ------------------------------------------------------------------------

    def start(
        self,
        choreography: Choreography,
        new: NewChoreographedSaga,
        event: OutgoingEvent,
        now: datetime,
    ) -> tuple[str, bool]:
        """The saga row, its start event (to publish) and the transition, one transaction.
        (saga id, created); a saga already started for the business key is returned."""
        state = track(choreography, None, event.name)
        with self._begin() as conn:
            inserted = conn.execute(
                counted(
                    self.backend.insert(sagas)
                    .values(
                        id=new.saga_id,
                        name=new.name,
                        business_key=new.business_key,
                        payload=new.payload,
                        payload_hash=new.payload_hash,
                        state=state.value,
                        current_step=0,
                        token=0,
                        version=1,
                        created_at=now,
                        updated_at=now,
                        deadline_at=new.deadline_at,
                        admitted=True,
                    )
                    .on_conflict_do_nothing()
                )
            ).rowcount
            if not inserted:
                existing = conn.execute(
                    select(sagas.c.id).where(
                        sagas.c.name == new.name, sagas.c.business_key == new.business_key
                    )
                ).scalar_one()
                return str(existing), False
            timeline.add_event(conn, self.backend, event, now, sent=False)
            timeline.log(
                conn,
                new.saga_id,
                now,
                event.name,
                "",
                state,
                timeline.published_by(event),
                auto(LIBRARY_SERVICE),
            )
        return new.saga_id, True

    # -- tracking ---------------------------------------------------------------------

    def record(
        self,
        choreography: Choreography,
        saga_id: str,
        consumed: Consumed | None,
        published: Sequence[OutgoingEvent],
        now: datetime,
    ) -> SagaState | None:
        """A handler's reaction and the events it published: the timeline rows that are new
        and the saga's state after them (None: no such saga)."""
        with self._begin() as conn:
            return self.record_in(conn, choreography, saga_id, consumed, published, now)

    def record_in(
        self,
        conn: Connection,
        choreography: Choreography,
        saga_id: str,
        consumed: Consumed | None,
        published: Sequence[OutgoingEvent],
        now: datetime,
    ) -> SagaState | None:
        """``record`` in the caller's transaction on the saga database (a handler's own,
        when its service keeps its tables in the saga database: one commit per hop)."""
        row = self._lock(conn, saga_id)
        if row is None:
            return None
        old = SagaState(row.state)
        state = old
        if consumed is not None and timeline.add_reaction(
            conn, self.backend, saga_id, consumed, now
        ):
            note = f"consumed by {consumed.handler}"
            if consumed.outcome != "ok":
                note += f" ({consumed.outcome})"
            timeline.log(
                conn,
                saga_id,
                now,
                consumed.event_name,
                state,
                state,
                note,
                auto(consumed.handler),
            )
        for event in published:
            if timeline.add_event(conn, self.backend, event, now, sent=True):
                new = track(choreography, state, event.name)
                timeline.log(
                    conn,
                    saga_id,
                    now,
                    event.name,
                    state,
                    new,
                    timeline.published_by(event),
                    auto(event.handler or event.service),
                )
                state = new
        timeline.update_state(conn, saga_id, old, state, now, published)
        return state

    def fail_overdue(
        self, choreography: Choreography, now: datetime, limit: int
    ) -> tuple[PublishedEvent, ...]:
        """Sagas of ``choreography`` past their deadline and unfinished: each gets the
        ``on_deadline`` event (to publish) and its state change, in the claiming
        transaction, once (``SKIP LOCKED``: two scans never take the same saga)."""
        if choreography.on_deadline is None:
            return ()
        fired = exists().where(
            events.c.saga_id == sagas.c.id, events.c.name == choreography.on_deadline
        )
        query = (
            select(sagas)
            .where(
                sagas.c.name == choreography.name,
                sagas.c.finished_at.is_(None),
                sagas.c.deadline_at.is_not(None),
                sagas.c.deadline_at <= now,
                ~fired,
            )
            .order_by(sagas.c.deadline_at)
            .limit(limit)
        )
        query = self.backend.skip_locked(query, of=sagas)
        fired_events: list[PublishedEvent] = []
        with self._begin() as conn:
            for row in conn.execute(query).all():
                event = OutgoingEvent(
                    event_id=deadline_event_id(row.id),
                    saga_id=row.id,
                    name=choreography.on_deadline,
                    service=LIBRARY_SERVICE,
                    data={**row.payload, "reason": f"deadline passed ({row.deadline_at:%H:%M:%S})"},
                )
                if not timeline.add_event(conn, self.backend, event, now, sent=False):
                    continue
                old = SagaState(row.state)
                new = track(choreography, old, event.name)
                timeline.log(
                    conn,
                    row.id,
                    now,
                    event.name,
                    old,
                    new,
                    "deadline passed: " + timeline.published_by(event),
                    auto("celery_sagas.scan"),
                )
                timeline.update_state(conn, row.id, old, new, now, [event])
                fired_events.append(timeline.as_published(event, now))
        return tuple(fired_events)

    # -- the library's own events (start, deadline) -------------------------------------

    def unsent(self, name: str, created_before: datetime, limit: int) -> tuple[PublishedEvent, ...]:
        """The library's unsent events of choreography ``name``'s sagas (another
        choreography's relay delivers its own: it alone knows their handlers)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(events)
                .join(sagas, sagas.c.id == events.c.saga_id)
                .where(
                    events.c.sent_at.is_(None),
                    events.c.published_at < created_before,
                    sagas.c.name == name,
                )
                .order_by(events.c.id)
                .limit(limit)
            ).all()
        return tuple(timeline.published(r) for r in rows)

    def mark_sent(self, event_ids: Sequence[str], now: datetime) -> None:
        if not event_ids:
            return
        with self._begin() as conn:
            self.backend.relax_commit(conn)  # a lost mark: a harmless duplicate publish
            conn.execute(
                update(events)
                .where(events.c.event_id.in_(list(event_ids)), events.c.sent_at.is_(None))
                .values(sent_at=now)
            )

    # -- reading ----------------------------------------------------------------------

    def sagas_of(self, name: str, saga_ids: Iterable[str]) -> frozenset[str]:
        """Those of ``saga_ids`` that are sagas of choreography ``name``."""
        wanted = sorted(set(saga_ids))
        if not wanted:
            return frozenset()
        with self.engine.connect() as conn:
            found = conn.execute(
                select(sagas.c.id).where(sagas.c.id.in_(wanted), sagas.c.name == name)
            ).scalars()
            return frozenset(found)

    def timeline(
        self, saga_id: str
    ) -> tuple[tuple[PublishedEvent, ...], frozenset[tuple[str, str]]]:
        """The saga's events in publication order, and the (event_id, handler) pairs
        that reacted."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(events).where(events.c.saga_id == saga_id).order_by(events.c.id)
            ).all()
            pairs = conn.execute(
                select(reactions.c.event_id, reactions.c.handler).where(
                    reactions.c.saga_id == saga_id
                )
            ).all()
        return tuple(timeline.published(r) for r in rows), frozenset((p[0], p[1]) for p in pairs)

    def event(self, event_id: str) -> PublishedEvent | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(events).where(events.c.event_id == event_id)).one_or_none()
        return timeline.published(row) if row else None

    def log(self, saga_id: str, step: str, note: str, actor: str, now: datetime) -> None:
        """A timeline row that changes no state (a replay, an operator action)."""
        with self._begin() as conn:
            state = conn.execute(select(sagas.c.state).where(sagas.c.id == saga_id)).scalar_one()
            timeline.log(conn, saga_id, now, step, state, state, note, actor)

    # -- rows -------------------------------------------------------------------------

    def _lock(self, conn: Connection, saga_id: str) -> Any:
        query = select(sagas.c.state, sagas.c.version).where(sagas.c.id == saga_id)
        return conn.execute(self.backend.lock(query)).one_or_none()
