"""Retention on SQL: pruning finished sagas with every row they own, and the periodic
compaction of guards and sent outbox rows nothing will read again.

Each function runs in the caller's (short) transaction. Sagas are taken with the
backend's ``skip_locked`` (PostgreSQL: ``FOR UPDATE SKIP LOCKED``; SQLite serialises
writers), so live work never waits for a retention job.

Guards have no saga id column: their keys are ``saga_id:step:action|compensation`` and
``saga_id:hook:hook``, so a saga's guards are found by their exact keys, built from its
step names (its steps, and its transitions for steps a definition change renamed), each
an equality on the guard table's primary key. A prefix match would need an index in the
"C" collation and would take ``a:b``'s guards with saga ``a``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    delete,
    func,
    literal,
    or_,
    select,
    union,
    update,
)

from celery_sagas import row_filters
from celery_sagas.machine.dead_letters import OPEN_DEAD_LETTER
from celery_sagas.protocols import PRUNED_TABLES, SENT_ROWS_PER_SAGA, Compacted, Pruned
from celery_sagas.row_changes import OUTBOX_WINDOW_FACTOR, owned_guard_keys
from celery_sagas.store.backends import Backend
from celery_sagas.store.filters import where
from celery_sagas.store.tables import (
    attempts,
    dead_letters,
    events,
    guards,
    outbox,
    reactions,
    sagas,
    steps,
    transitions,
)

KEYS_PER_STATEMENT = 5000  # bound parameters per DELETE (SQLite allows 32766)


def _prunable(finished_before: datetime, name: str | None) -> ColumnElement[bool]:
    """``row_filters.prunable``, and no open dead letter."""
    open_dead_letter = (
        select(dead_letters.c.id)
        .where(
            dead_letters.c.saga_id == sagas.c.id,
            dead_letters.c.status.in_(OPEN_DEAD_LETTER),
        )
        .exists()
    )
    return and_(*where(sagas, row_filters.prunable(finished_before, name)), ~open_dead_letter)


def count_prunable(conn: Connection, finished_before: datetime, name: str | None) -> int:
    query = select(func.count()).select_from(sagas).where(_prunable(finished_before, name))
    return int(conn.execute(query).scalar_one())


def _after(after: tuple[datetime, str] | None) -> ColumnElement[bool]:
    """Sagas past the keyset ``after`` in ``(created_at, id)`` order (a range on the
    ``created_at`` index, not a row comparison the index cannot serve)."""
    if after is None:
        return literal(True)
    created_at, saga_id = after
    return and_(
        sagas.c.created_at >= created_at,
        or_(sagas.c.created_at > created_at, sagas.c.id > saga_id),
    )


def step_names(ids: Sequence[str]) -> Select[Any]:
    """``(saga_id, step name)`` of the sagas ``ids``: their steps, and the steps their
    transitions name (a definition change may have renamed some)."""
    return union(  # type: ignore[return-value]
        select(steps.c.saga_id, steps.c.name).where(steps.c.saga_id.in_(ids)),
        select(transitions.c.saga_id, transitions.c.step).where(
            transitions.c.saga_id.in_(ids), transitions.c.step.is_not(None)
        ),
    )


def _delete_guards(conn: Connection, ids: Sequence[str]) -> int:
    """Delete by the exact keys (``definition.guard_keys``), each an index probe; one
    statement joining a key list would let the planner hash-join a scan of the whole
    guard table instead."""
    pairs = ((saga_id, name) for saga_id, name in conn.execute(step_names(ids)))
    keys = sorted(owned_guard_keys(ids, pairs))
    deleted = 0
    for start in range(0, len(keys), KEYS_PER_STATEMENT):
        chunk = keys[start : start + KEYS_PER_STATEMENT]
        deleted += conn.execute(delete(guards).where(guards.c.key.in_(chunk))).rowcount
    return deleted


def delete_sent_outbox(conn: Connection, sent_before: datetime, limit: int) -> int:
    """The rows ``row_changes.sent_rows_deleted`` picks, in SQL: a walk of the primary key
    from its start, which stops after the oldest ``limit * OUTBOX_WINDOW_FACTOR`` rows,
    so a pass never reads the whole table, however many recent rows it holds."""
    first = select(outbox.c.created_at).order_by(outbox.c.id).limit(1)
    created = conn.execute(first).scalar_one_or_none()
    if created is None or created >= sent_before:  # the oldest row is too young: done
        return 0
    oldest = (
        select(outbox.c.id, outbox.c.sent_at)
        .order_by(outbox.c.id)
        .limit(limit * OUTBOX_WINDOW_FACTOR)
        .subquery()
    )
    doomed = select(oldest.c.id).where(oldest.c.sent_at < sent_before).limit(limit)
    return conn.execute(delete(outbox).where(outbox.c.id.in_(doomed.scalar_subquery()))).rowcount


def prune(
    conn: Connection,
    finished_before: datetime,
    limit: int,
    name: str | None,
    after: tuple[datetime, str] | None,
    backend: Backend,
) -> Pruned:
    """One batch (see ``SagaStore.prune``), in the caller's transaction."""
    query = (
        select(sagas.c.id, sagas.c.created_at)
        .where(_prunable(finished_before, name), _after(after))
        .order_by(sagas.c.created_at, sagas.c.id)
        .limit(limit)
    )
    taken = conn.execute(backend.skip_locked(query, of=sagas)).all()
    rows = dict.fromkeys(PRUNED_TABLES, 0)
    rows["saga_outbox"] = delete_sent_outbox(conn, finished_before, limit * SENT_ROWS_PER_SAGA)
    if not taken:
        return Pruned(0, rows, None)
    ids = [row.id for row in taken]
    rows["saga_guard"] = _delete_guards(conn, ids)
    # the sent rows went above; the unsent ones are found through their partial index
    unsent = delete(outbox).where(outbox.c.saga_id.in_(ids), outbox.c.sent_at.is_(None))
    rows["saga_outbox"] += conn.execute(unsent).rowcount
    by_saga: tuple[tuple[str, Any], ...] = (
        ("saga_attempt", attempts.c.saga_id),
        ("saga_dead_letter", dead_letters.c.saga_id),
        ("saga_transition", transitions.c.saga_id),
        ("saga_step", steps.c.saga_id),
        ("saga_reaction", reactions.c.saga_id),  # a choreographed saga's timeline
        ("saga_event", events.c.saga_id),
        ("saga", sagas.c.id),
    )
    for table_name, column in by_saga:
        deleted = conn.execute(delete(column.table).where(column.in_(ids))).rowcount
        rows[table_name] += deleted
    last = taken[-1]
    return Pruned(len(ids), rows, (last.created_at, last.id))


def compact(
    conn: Connection, finished_before: datetime, now: datetime, limit: int, backend: Backend
) -> Compacted:
    """One pass (see ``SagaStore.compact``), in the caller's transaction: walks the small
    partial index of finished sagas not compacted yet."""
    unsent = select(outbox.c.id).where(outbox.c.saga_id == sagas.c.id, outbox.c.sent_at.is_(None))
    query = (
        select(sagas.c.id)
        .where(*where(sagas, row_filters.compactable(finished_before)), ~unsent.exists())
        .order_by(sagas.c.finished_at)
        .limit(limit)
    )
    ids = list(conn.execute(backend.skip_locked(query, of=sagas)).scalars())
    sent = delete_sent_outbox(conn, finished_before, limit * SENT_ROWS_PER_SAGA)
    if not ids:
        return Compacted(0, 0, sent)
    deleted = _delete_guards(conn, ids)
    conn.execute(update(sagas).where(sagas.c.id.in_(ids)).values(compacted_at=now))
    return Compacted(len(ids), deleted, sent)
