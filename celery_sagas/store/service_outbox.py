"""A choreography service's own tables, in the service's database (which may not be the
saga database): the idempotency guard of its handlers and the outbox of the events they
publish. A handler's work, its guard row and its outbox rows commit in one transaction.

Create them with ``create_service_tables(url)`` (or ``service_metadata.create_all``) in
each service database.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    Engine,
    Index,
    MetaData,
    String,
    Table,
    select,
    update,
)

from celery_sagas import row_filters
from celery_sagas.choreography import OutgoingEvent, Reaction
from celery_sagas.store.backends import backend_named
from celery_sagas.store.drivers import counted
from celery_sagas.store.engine import engine_of
from celery_sagas.store.filters import where
from celery_sagas.store.tables import Id, UtcDateTime
from celery_sagas.store.timeline_rows import event_columns

service_metadata = MetaData()

service_guards = Table(
    "choreography_guard",
    service_metadata,
    Column("event_id", String(36), primary_key=True),
    Column("handler", String(400), primary_key=True),
    Column("saga_id", String(36), nullable=False),
    Column("outcome", String(16), nullable=False),  # ok | business
    Column("recorded_at", UtcDateTime(), nullable=False),
)

service_outbox = Table(
    "choreography_outbox",
    service_metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("saga_id", String(36), nullable=False),
    Column("name", String(200), nullable=False),
    Column("service", String(200), nullable=False),
    Column("handler", String(400)),
    Column("caused_by", String(36)),
    Column("payload", JSON, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("sent_at", UtcDateTime()),
)
Index(
    "ix_choreography_outbox_unsent",
    service_outbox.c.created_at,
    postgresql_where=service_outbox.c.sent_at.is_(None),
    sqlite_where=service_outbox.c.sent_at.is_(None),
)

# the handler's work: given the transaction, returns the events it published
Work = Callable[[Connection], Sequence[OutgoingEvent]]
# a declared business error: the failure event(s) to publish instead
OnBusiness = Callable[[BaseException], Sequence[OutgoingEvent]]
# last in the handler's transaction, with what it did
BeforeCommit = Callable[[Connection, Reaction], None]


def create_service_tables(url_or_engine: str | Engine) -> None:
    """Create the guard and outbox tables in a service's database (if missing)."""
    engine = engine_of(url_or_engine)
    service_metadata.create_all(engine)


def _event(row: Any) -> OutgoingEvent:
    return OutgoingEvent(
        event_id=row.event_id,
        saga_id=row.saga_id,
        name=row.name,
        service=row.service,
        data=row.payload,
        handler=row.handler,
        caused_by=row.caused_by,
        id=row.id,
    )


class ServiceOutbox:
    """One service database: runs handlers behind their guard, keeps their outbox."""

    def __init__(self, url_or_engine: str | Engine, prepare: bool = True) -> None:
        """``prepare=False``: no server-side prepared statements (psycopg 3 behind a
        pooler in transaction mode; psycopg2 prepares nothing here anyway)."""
        self.engine = engine_of(url_or_engine, prepare)
        self.backend = backend_named(self.engine.dialect.name)

    def react(
        self,
        saga_id: str,
        handler: str,
        event_id: str,
        work: Work,
        on_business: OnBusiness | None,
        business_errors: tuple[type[BaseException], ...],
        now: datetime,
        before_commit: BeforeCommit | None = None,
    ) -> Reaction:
        """Run ``work`` once per (event, handler): the guard row first (a concurrent
        duplicate waits on it, then finds it), the work in a savepoint, the outbox rows and
        the guard's outcome after it, one transaction. A business error rolls the work back
        and commits the guard with ``on_business``'s events; anything else rolls back all."""
        with self.engine.begin() as conn:
            claimed = conn.execute(
                counted(
                    self.backend.insert(service_guards)
                    .values(
                        event_id=event_id,
                        handler=handler,
                        saga_id=saga_id,
                        outcome="running",
                        recorded_at=now,
                    )
                    .on_conflict_do_nothing()
                )
            ).rowcount
            if not claimed:
                recorded = conn.execute(
                    select(service_guards.c.outcome).where(
                        service_guards.c.event_id == event_id, service_guards.c.handler == handler
                    )
                ).scalar_one()
                duplicate = Reaction(
                    "duplicate", self._unsent_of(conn, event_id, handler), recorded
                )
                if before_commit is not None:
                    before_commit(conn, duplicate)
                return duplicate
            outcome, events = self._run(conn, work, on_business, business_errors)
            written = tuple(self._write(conn, event, now) for event in events)
            conn.execute(
                update(service_guards)
                .where(service_guards.c.event_id == event_id, service_guards.c.handler == handler)
                .values(outcome=outcome)
            )
            reaction = Reaction(outcome, written)
            if before_commit is not None:
                before_commit(conn, reaction)
        return reaction

    @staticmethod
    def _run(
        conn: Connection,
        work: Work,
        on_business: OnBusiness | None,
        business_errors: tuple[type[BaseException], ...],
    ) -> tuple[str, Sequence[OutgoingEvent]]:
        savepoint = conn.begin_nested()
        try:
            events = work(conn)
        except business_errors as exc:
            savepoint.rollback()
            if on_business is None:
                raise
            return "business", on_business(exc)
        except BaseException:
            savepoint.rollback()
            raise
        savepoint.commit()
        return "ok", events

    @staticmethod
    def _write(conn: Connection, event: OutgoingEvent, now: datetime) -> OutgoingEvent:
        row_id = conn.execute(
            service_outbox.insert()
            .values(**event_columns(event), created_at=now)
            .returning(service_outbox.c.id)
        ).scalar_one()
        return replace(event, id=row_id)

    @staticmethod
    def _unsent_of(conn: Connection, event_id: str, handler: str) -> tuple[OutgoingEvent, ...]:
        rows = conn.execute(
            select(service_outbox)
            .where(
                service_outbox.c.caused_by == event_id,
                service_outbox.c.handler == handler,
                service_outbox.c.sent_at.is_(None),
            )
            .order_by(service_outbox.c.id)
        ).all()
        return tuple(_event(r) for r in rows)

    def unsent(self, created_before: datetime, limit: int) -> tuple[OutgoingEvent, ...]:
        """Outbox rows left unsent (a worker died between commit and publish)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(service_outbox)
                .where(*where(service_outbox, row_filters.unsent(created_before)))
                .order_by(service_outbox.c.id)
                .limit(limit)
            ).all()
        return tuple(_event(r) for r in rows)

    def mark_sent(self, ids: Sequence[int], now: datetime) -> None:
        if not ids:
            return
        with self.engine.begin() as conn:
            self.backend.relax_commit(conn)  # a lost mark: a harmless duplicate publish
            conn.execute(
                update(service_outbox)
                .where(service_outbox.c.id.in_(list(ids)), service_outbox.c.sent_at.is_(None))
                .values(sent_at=now)
            )

    def reacted(self, event_id: str, handler: str) -> str | None:
        """The guard's outcome for (event, handler), or None."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(service_guards.c.outcome).where(
                    service_guards.c.event_id == event_id, service_guards.c.handler == handler
                )
            ).scalar_one_or_none()
