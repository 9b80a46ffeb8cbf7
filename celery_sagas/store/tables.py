"""The saga schema (SQLAlchemy Core). Migrations in ``migrations/`` must produce exactly this."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, overload

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
    true,
)

metadata = MetaData()


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use timezone-aware datetimes")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return stored_utc(value)


@overload
def stored_utc(moment: datetime) -> datetime: ...
@overload
def stored_utc(moment: None) -> None: ...
@overload
def stored_utc(moment: datetime | None) -> datetime | None: ...
def stored_utc(moment: datetime | None) -> datetime | None:
    """A datetime as the database returned it, UTC-aware (SQLite's are naive, in UTC)."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# BigInteger ids autoincrement on PostgreSQL; SQLite only autoincrements INTEGER keys.
Id = BigInteger().with_variant(Integer(), "sqlite")

sagas = Table(
    "saga",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("business_key", String(200), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("payload_hash", String(64), nullable=False),
    Column("state", String(32), nullable=False),
    Column("current_step", Integer, nullable=False),
    Column("token", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("reason", Text),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("finished_at", UtcDateTime()),
    Column("deadline_at", UtcDateTime()),
    Column("due_at", UtcDateTime()),
    Column("admitted", Boolean, nullable=False, server_default=true()),
    Column("stuck_reported_at", UtcDateTime()),
    Column("definition", String(64)),  # the fingerprint of the definition it started with
    # when the periodic pass deleted its guards and sent outbox rows (retention)
    Column("compacted_at", UtcDateTime()),
    UniqueConstraint("name", "business_key", name="uq_saga_name_business_key"),
)
Index("ix_saga_state", sagas.c.state)
Index("ix_saga_created_at", sagas.c.created_at)
# The scanner's partial indexes cover live sagas only, so they stay small however many
# finished sagas the table holds.
Index(
    "ix_saga_due",
    sagas.c.due_at,
    postgresql_where=sagas.c.due_at.is_not(None),
    sqlite_where=sagas.c.due_at.is_not(None),
)
Index(
    "ix_saga_waiting",
    sagas.c.name,
    sagas.c.created_at,
    postgresql_where=sagas.c.admitted.is_(false()) & (sagas.c.state == "STARTED"),
    sqlite_where=sagas.c.admitted.is_(false()) & (sagas.c.state == "STARTED"),
)
Index(
    "ix_saga_unfinished",
    sagas.c.created_at,
    postgresql_where=sagas.c.finished_at.is_(None),
    sqlite_where=sagas.c.finished_at.is_(None),
)

# Finished sagas whose guards the periodic pass has not deleted yet: it stays as small as
# the sagas finished within ``compact_after``, however many the table holds.
Index(
    "ix_saga_compactable",
    sagas.c.finished_at,
    postgresql_where=sagas.c.finished_at.is_not(None) & sagas.c.compacted_at.is_(None),
    sqlite_where=sagas.c.finished_at.is_not(None) & sagas.c.compacted_at.is_(None),
)

steps = Table(
    "saga_step",
    metadata,
    Column("saga_id", String(36), ForeignKey("saga.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("name", String(200), nullable=False),
    Column("status", String(32), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("compensation_attempts", Integer, nullable=False, server_default=text("0")),
    Column("result", JSON),
    Column("error", Text),
    Column("error_kind", String(16)),
    Column("started_at", UtcDateTime()),
    Column("finished_at", UtcDateTime()),
    Column("compensation_started_at", UtcDateTime()),
    Column("compensation_finished_at", UtcDateTime()),
    Column("deadline_at", UtcDateTime()),
    Column("redispatch_at", UtcDateTime()),
    Column("dispatches", Integer, nullable=False, server_default=text("0")),
)

transitions = Table(
    "saga_transition",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("saga_id", String(36), ForeignKey("saga.id", ondelete="CASCADE"), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    Column("step", String(200)),
    Column("old", String(32), nullable=False),
    Column("new", String(32), nullable=False),
    Column("reason", Text),
    Column("actor", String(200), nullable=False),
)
Index("ix_saga_transition_saga_id", transitions.c.saga_id, transitions.c.id)

outbox = Table(
    "saga_outbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("saga_id", String(36), nullable=False),
    Column("body", JSON, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("sent_at", UtcDateTime()),
    Column("key", String(300)),  # the guard key of a step message; None for DLQ messages
)
Index(
    "ix_saga_outbox_unsent_saga",
    outbox.c.saga_id,
    postgresql_where=outbox.c.sent_at.is_(None),
    sqlite_where=outbox.c.sent_at.is_(None),
)
Index(
    "ix_saga_outbox_unsent",
    outbox.c.created_at,
    postgresql_where=outbox.c.sent_at.is_(None),
    sqlite_where=outbox.c.sent_at.is_(None),
)

guards = Table(
    "saga_guard",
    metadata,
    Column("key", String(300), primary_key=True),
    Column("outcome", String(16), nullable=False),
    Column("result", JSON),
    Column("error", Text),
    Column("recorded_at", UtcDateTime(), nullable=False),
)

dead_letters = Table(
    "saga_dead_letter",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("saga_id", String(36), ForeignKey("saga.id", ondelete="CASCADE"), nullable=False),
    Column("saga_name", String(200), nullable=False),
    Column("step", Integer, nullable=False),
    Column("step_name", String(200), nullable=False),
    Column("task_name", String(400), nullable=False),
    # dead -> retrying -> resolved | dead again; dead -> discarded (fixed by hand)
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("deaths", Integer, nullable=False, server_default=text("1")),
    Column("error", Text),
    Column("traceback", Text),
    Column("payload", JSON, nullable=False),  # redacted
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("resolved_at", UtcDateTime()),
    Column("resolution", Text),
    Column("auto_retries", Integer, nullable=False, server_default=text("0")),
    Column("next_auto_retry_at", UtcDateTime()),
    UniqueConstraint("saga_id", "step", name="uq_saga_dead_letter_step"),
)
Index(
    "ix_saga_dead_letter_open",
    dead_letters.c.created_at,
    postgresql_where=dead_letters.c.status.in_(["dead", "retrying"]),
    sqlite_where=dead_letters.c.status.in_(["dead", "retrying"]),
)

attempts = Table(
    "saga_attempt",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("saga_id", String(36), ForeignKey("saga.id", ondelete="CASCADE"), nullable=False),
    Column("key", String(300), nullable=False),  # saga_id:step:action|compensation
    Column("attempt", Integer, nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    Column("error", Text, nullable=False),
)
Index("ix_saga_attempt_key", attempts.c.key, attempts.c.attempt)
# pruning deletes a saga's attempts (and the foreign key's cascade looks them up) by saga
Index("ix_saga_attempt_saga_id", attempts.c.saga_id)

# -- choreographed sagas (``celery_sagas.choreography``): their timeline, in the saga database

# Every event of a choreographed saga, in publication order. The start and deadline events
# are published by the library from here (``sent_at`` NULL until published); the events a
# service publishes are relayed from that service's own outbox and recorded here as sent.
events = Table(
    "saga_event",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("saga_id", String(36), ForeignKey("saga.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("service", String(200), nullable=False),
    Column("handler", String(400)),  # the handler that published it (None: the library)
    Column("caused_by", String(36)),  # the event that handler consumed
    Column("payload", JSON, nullable=False),
    Column("published_at", UtcDateTime(), nullable=False),
    Column("sent_at", UtcDateTime()),
)
Index("ix_saga_event_saga_id", events.c.saga_id, events.c.id)
Index(
    "ix_saga_event_unsent",
    events.c.published_at,
    postgresql_where=events.c.sent_at.is_(None),
    sqlite_where=events.c.sent_at.is_(None),
)

# One row per handler that consumed an event of a choreographed saga (once per pair).
reactions = Table(
    "saga_reaction",
    metadata,
    Column("event_id", String(36), primary_key=True),
    Column("handler", String(400), primary_key=True),
    Column("saga_id", String(36), ForeignKey("saga.id", ondelete="CASCADE"), nullable=False),
    Column("outcome", String(16), nullable=False),  # ok | business
    Column("at", UtcDateTime(), nullable=False),
)
Index("ix_saga_reaction_saga_id", reactions.c.saga_id)
