"""The tables of ``InMemorySagaStore`` (named like the SQL tables in ``row_counts``) and
the transaction over them; its writes, scans and retention are built on this."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any

from celery_sagas.machine import Decision
from celery_sagas.protocols import (
    AttemptRecord,
    DeadLetterRecord,
    GuardRecord,
    OutboxMessage,
    SagaRecord,
    TransitionRecord,
)
from celery_sagas.row_filters import Filter, holds
from celery_sagas.testing.columns import as_json


def detached(record: SagaRecord, with_steps: bool = True) -> SagaRecord:
    """A detached copy, as a fresh load from a database would be (and as the JSON columns
    store it)."""
    steps = tuple(replace(s, result=as_json(s.result)) for s in record.steps) if with_steps else ()
    return replace(record, payload=as_json(record.payload), steps=steps)


def oldest_first(saga: SagaRecord) -> tuple[datetime, str]:
    return saga.created_at, saga.saga_id


class MemoryTables:
    """Every table, behind one (re-entrant) lock; ``calls`` lists the store methods
    called, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._lock = threading.RLock()
        self._sagas: dict[str, SagaRecord] = {}
        self._hashes: dict[str, str] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._stuck_reported: dict[str, datetime] = {}
        self._transitions: list[TransitionRecord] = []
        self._outbox: dict[int, OutboxMessage] = {}
        self._outbox_keys: dict[int, str | None] = {}  # the ``key`` column: a step's guard key
        self._guards: dict[str, GuardRecord] = {}
        self._dead_letters: dict[int, DeadLetterRecord] = {}
        self._attempts: list[AttemptRecord] = []  # in insertion (id) order
        self._compacted: dict[str, datetime] = {}  # the ``compacted_at`` column
        self._outbox_ids = itertools.count(1)  # a sequence: ids are never reused

    def row_counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "saga": len(self._sagas),
                "saga_step": sum(len(s.steps) for s in self._sagas.values()),
                "saga_transition": len(self._transitions),
                "saga_outbox": len(self._outbox),
                "saga_guard": len(self._guards),
                "saga_dead_letter": len(self._dead_letters),
                "saga_attempt": len(self._attempts),
            }

    def _columns(self, saga: SagaRecord) -> dict[str, Any]:
        """``saga``'s row by column name, as ``row_filters`` reads it: its fields, and the
        two columns the fake keeps beside the records."""
        return {
            **vars(saga),
            "stuck_reported_at": self._stuck_reported.get(saga.saga_id),
            "compacted_at": self._compacted.get(saga.saga_id),
        }

    def _sagas_where(self, conditions: Filter) -> list[SagaRecord]:
        """The sagas whose row passes ``conditions``, as the SQL store's WHERE takes them."""
        return [s for s in self._sagas.values() if holds(conditions, self._columns(s))]

    @contextmanager
    def _transaction(self, call: str) -> Iterator[None]:
        """Hold the lock; on an error, put every table back as it was."""
        with self._lock:
            self.calls.append(call)
            tables = (
                "_sagas",
                "_hashes",
                "_keys",
                "_stuck_reported",
                "_outbox",
                "_outbox_keys",
                "_guards",
                "_dead_letters",
                "_compacted",
            )
            saved = {name: dict(getattr(self, name)) for name in tables}
            transitions, attempts = len(self._transitions), len(self._attempts)
            try:
                yield
            except BaseException:
                for name, table in saved.items():
                    setattr(self, name, table)
                del self._transitions[transitions:]
                del self._attempts[attempts:]
                raise

    def _commit(
        self,
        call: str | None,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        """Write ``decision`` (the store's writes: ``InMemorySagaStore``)."""
        raise NotImplementedError
