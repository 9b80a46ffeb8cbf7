"""The dead-letter rows of ``InMemorySagaStore``, as ``celery_sagas.store.dead_letters``
writes them (without SQLAlchemy): pure functions from the current entries to new ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime

from celery_sagas.errors import SagaError
from celery_sagas.machine import DeadLetterChange
from celery_sagas.machine.dead_letters import ALLOWED_FROM, OPEN_DEAD_LETTER, moved_values
from celery_sagas.protocols import DeadLetterRecord, SagaRecord
from celery_sagas.row_changes import buried_columns, new_entry_columns
from celery_sagas.testing.columns import as_json, as_utc


def detached(entry: DeadLetterRecord) -> DeadLetterRecord:
    """A copy as a fresh read would return it (the payload is not shared)."""
    return replace(entry, payload=as_json(entry.payload))


def entry_for(
    entries: Mapping[int, DeadLetterRecord], saga_id: str, step: int
) -> DeadLetterRecord | None:
    """The entry of ``(saga_id, step)``: there is at most one (a unique constraint in SQL)."""
    return next((e for e in entries.values() if e.saga_id == saga_id and e.step == step), None)


def changed(
    entries: Mapping[int, DeadLetterRecord],
    saga: SagaRecord,
    change: DeadLetterChange,
    now: datetime,
) -> DeadLetterRecord | None:
    """The entry as ``change`` leaves it (written in the saga's transaction), or None when
    the change does not apply (e.g. ``resolved`` on an entry that is not ``retrying``)."""
    existing = entry_for(entries, saga.saga_id, change.step)
    if change.status == "dead":
        return _buried(entries, existing, saga, change, now)
    if existing is None or existing.status not in ALLOWED_FROM[change.status]:
        return None
    return replace(existing, **moved_values(change.status, now, change.resolution))


def _buried(
    entries: Mapping[int, DeadLetterRecord],
    existing: DeadLetterRecord | None,
    saga: SagaRecord,
    change: DeadLetterChange,
    now: datetime,
) -> DeadLetterRecord:
    """A new entry, or the existing one dead again (a retried compensation failed again)."""
    if not 0 <= change.step < len(saga.steps):
        raise SagaError(
            f"saga {saga.saga_id} has no step {change.step}; nothing was written",
            saga_id=saga.saga_id,
        )
    values = buried_columns(change, now)
    if values["next_auto_retry_at"] is not None:
        values["next_auto_retry_at"] = as_utc(values["next_auto_retry_at"])
    if existing is not None:
        return replace(existing, deaths=existing.deaths + 1, **values)
    step_name = saga.steps[change.step].name
    columns = new_entry_columns(saga.saga_id, saga.name, step_name, change, now)
    columns.update(values, payload=as_json(columns["payload"]))
    return DeadLetterRecord(id=max(entries, default=0) + 1, **columns)


def matches(entry: DeadLetterRecord, saga_id: str | None, status: str | None) -> bool:
    """The filter of ``dead_letters()``: ``status="open"`` is dead or retrying; None and
    ``"all"`` are every status."""
    if saga_id is not None and entry.saga_id != saga_id:
        return False
    if status == "open":
        return entry.status in OPEN_DEAD_LETTER
    return status in (None, "all") or entry.status == status
