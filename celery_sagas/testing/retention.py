"""Retention in ``InMemorySagaStore``: what ``prune`` and ``compact`` take beyond their
``row_filters``, and the guard keys a saga can have written, by the rules of
``celery_sagas.store.retention``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from celery_sagas.machine.dead_letters import OPEN_DEAD_LETTER
from celery_sagas.protocols import (
    SENT_ROWS_PER_SAGA,
    DeadLetterRecord,
    OutboxMessage,
    SagaRecord,
    TransitionRecord,
)
from celery_sagas.row_changes import owned_guard_keys, sent_rows_deleted


def held(saga: SagaRecord, dead_letters: Iterable[DeadLetterRecord]) -> bool:
    """Whether ``saga`` has an open dead letter (an operator's to resolve): not pruned."""
    return any(e.saga_id == saga.saga_id and e.status in OPEN_DEAD_LETTER for e in dead_letters)


def past(saga: SagaRecord, after: tuple[datetime, str] | None) -> bool:
    """After the keyset ``after`` in ``(created_at, saga_id)`` order."""
    return after is None or (saga.created_at, saga.saga_id) > after


def guard_keys_of(saga: SagaRecord, transitions: Iterable[TransitionRecord]) -> set[str]:
    """Every guard key ``saga`` can have written, by the names of its steps and of the
    steps its transitions name (as the SQL store)."""
    pairs = [(saga.saga_id, s.name) for s in saga.steps]
    pairs += [(t.saga_id, t.step) for t in transitions if t.saga_id == saga.saga_id and t.step]
    return owned_guard_keys([saga.saga_id], pairs)


def sent_before(outbox: Mapping[int, OutboxMessage], when: datetime, sagas: int) -> list[int]:
    """The ids of the sent rows a pass over ``sagas`` sagas deletes
    (``row_changes.sent_rows_deleted``)."""
    oldest_first = ((i, m.created_at, m.sent_at) for i, m in sorted(outbox.items()))
    return sent_rows_deleted(oldest_first, when, sagas * SENT_ROWS_PER_SAGA)
