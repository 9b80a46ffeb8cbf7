"""Retention in ``InMemorySagaStore``: ``prune`` and ``compact`` delete what
``celery_sagas.store.retention`` deletes (which sagas: ``testing.retention``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from celery_sagas import row_filters
from celery_sagas.protocols import PRUNED_TABLES, Compacted, Pruned, SagaRecord
from celery_sagas.testing import retention
from celery_sagas.testing.columns import as_utc
from celery_sagas.testing.tables import MemoryTables, oldest_first


class MemoryRetention(MemoryTables):
    """``prune`` and ``compact`` over the tables."""

    def prunable(self, finished_before: datetime, name: str | None = None) -> int:
        finished_before = as_utc(finished_before)
        with self._lock:
            self.calls.append("prunable")
            return len(self._prunable(finished_before, name))

    def _prunable(self, finished_before: datetime, name: str | None) -> list[SagaRecord]:
        """``row_filters.prunable``, and no open dead letter (as ``store.retention``)."""
        entries = self._dead_letters.values()
        taken = self._sagas_where(row_filters.prunable(finished_before, name))
        return [s for s in taken if not retention.held(s, entries)]

    def prune(
        self,
        finished_before: datetime,
        limit: int,
        name: str | None = None,
        after: tuple[datetime, str] | None = None,
    ) -> Pruned:
        finished_before = as_utc(finished_before)
        with self._transaction("prune"):
            taken = sorted(
                (s for s in self._prunable(finished_before, name) if retention.past(s, after)),
                key=oldest_first,
            )[:limit]
            rows = dict.fromkeys(PRUNED_TABLES, 0)
            rows["saga_outbox"] = self._delete_outbox(
                retention.sent_before(self._outbox, finished_before, limit)
            )
            for saga in taken:
                self._delete_saga(saga, rows)
            last = (taken[-1].created_at, taken[-1].saga_id) if taken else None
            return Pruned(len(taken), rows, last)

    def _delete_saga(self, saga: SagaRecord, rows: dict[str, int]) -> None:
        saga_id = saga.saga_id
        rows["saga_guard"] += self._delete_guards(saga)
        kept = [a for a in self._attempts if a.saga_id != saga_id]
        rows["saga_attempt"] += len(self._attempts) - len(kept)
        self._attempts[:] = kept
        unsent = [i for i, m in self._outbox.items() if m.saga_id == saga_id and not m.sent_at]
        rows["saga_outbox"] += self._delete_outbox(unsent)
        dead = [i for i, e in self._dead_letters.items() if e.saga_id == saga_id]
        for entry_id in dead:
            del self._dead_letters[entry_id]
        rows["saga_dead_letter"] += len(dead)
        kept_log = [t for t in self._transitions if t.saga_id != saga_id]
        rows["saga_transition"] += len(self._transitions) - len(kept_log)
        self._transitions[:] = kept_log
        rows["saga_step"] += len(saga.steps)
        rows["saga"] += 1
        del self._sagas[saga_id], self._hashes[saga_id], self._keys[(saga.name, saga.business_key)]
        self._stuck_reported.pop(saga_id, None)
        self._compacted.pop(saga_id, None)

    def _delete_guards(self, saga: SagaRecord) -> int:
        keys = retention.guard_keys_of(saga, self._transitions) & self._guards.keys()
        for key in keys:
            del self._guards[key]
        return len(keys)

    def _delete_outbox(self, ids: Sequence[int]) -> int:
        for message_id in ids:
            del self._outbox[message_id]
            self._outbox_keys.pop(message_id, None)
        return len(ids)

    def compact(self, finished_before: datetime, limit: int, now: datetime) -> Compacted:
        finished_before = as_utc(finished_before)
        with self._transaction("compact"):
            unsent = {m.saga_id for m in self._outbox.values() if m.sent_at is None}
            taken = sorted(
                (
                    s
                    for s in self._sagas_where(row_filters.compactable(finished_before))
                    if s.saga_id not in unsent
                ),
                key=lambda s: s.finished_at or finished_before,
            )[:limit]
            sent = self._delete_outbox(retention.sent_before(self._outbox, finished_before, limit))
            guards = sum(self._delete_guards(s) for s in taken)
            self._compacted.update(dict.fromkeys((s.saga_id for s in taken), as_utc(now)))
            return Compacted(len(taken), guards, sent)
