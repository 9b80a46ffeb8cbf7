"""What writing a decision does to a saga's rows, as pure values: the one rule that the SQL
store turns into statements and the in-memory fake (``celery_sagas.testing``) applies to its
records. No I/O, no SQLAlchemy: plain values in, plain values out.

Column values are keyed by the SQL column names; ``saga_fields`` and ``step_fields`` name
the same values as ``SagaRecord``/``StepRecord`` fields.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from celery_sagas.definition import guard_keys
from celery_sagas.errors import ConcurrentUpdateError, PayloadConflictError, SagaError
from celery_sagas.machine import (
    TERMINAL_STATES,
    DeadLetterChange,
    Decision,
    SagaState,
    StepChange,
    StepStatus,
)
from celery_sagas.machine.dead_letters import DeadLetterStatus
from celery_sagas.records import (
    COORDINATOR,
    STARTED,
    DeadLetterRecord,
    GuardRecord,
    NewSaga,
    OutboxMessage,
    SagaRecord,
    StepRecord,
    TransitionRecord,
    step_values,
)


def actor(decision: Decision) -> str:
    """Who the transition log says made ``decision``."""
    return decision.actor or COORDINATOR


# -- the saga row ------------------------------------------------------------------------


def new_saga_columns(new: NewSaga, decision: Decision, now: datetime) -> dict[str, Any]:
    """The columns of a new saga row (version 1)."""
    assert decision.state is not None
    return {
        "id": new.saga_id,
        "name": new.name,
        "business_key": new.business_key,
        "payload": dict(new.payload),
        "payload_hash": new.payload_hash,
        "state": decision.state.value,
        "current_step": decision.current_step,
        "token": decision.token,
        "version": 1,
        "created_at": now,
        "updated_at": now,
        "deadline_at": new.deadline_at,
        "due_at": decision.due_at,
        "admitted": decision.admitted,
        "definition": new.definition,
    }


def saga_columns(saga: SagaRecord, decision: Decision, now: datetime) -> dict[str, Any]:
    """The columns ``decision`` sets on the saga row read as ``saga`` (its version one up);
    the ones it leaves alone are absent: ``reason`` unless the decision gives one,
    ``finished_at`` unless the saga finishes, ``admitted`` unless it is admitted now."""
    assert decision.accepted and decision.state is not None
    values: dict[str, Any] = {
        "state": decision.state.value,
        "current_step": decision.current_step,
        "token": decision.token,
        "version": saga.version + 1,
        "updated_at": now,
        "due_at": decision.due_at,
    }
    if decision.reason is not None:
        values["reason"] = decision.reason
    if decision.state in TERMINAL_STATES:
        values["finished_at"] = now
    if decision.admitted:
        values["admitted"] = True
    return values


def still_at(current: SagaRecord | None, read: SagaRecord) -> bool:
    """The compare-and-set on ``version``: the saga is still as ``read`` saw it."""
    return current is not None and current.version == read.version


def changed_since(read: SagaRecord) -> ConcurrentUpdateError:
    """The error of a write whose saga changed since ``read`` (nothing was written)."""
    return ConcurrentUpdateError(
        f"saga {read.saga_id} changed since version {read.version}", saga_id=read.saga_id
    )


def refused_start(
    new: NewSaga, existing_id: str | None, existing_hash: str | None
) -> SagaError | None:
    """Why a start whose saga id or business key is taken writes nothing, or None when it
    is the same start again (same name, business key and payload: the existing saga
    ``existing_id`` is its answer). ``existing_*``: the saga of ``new``'s business key
    (None: the id alone is taken, by another saga)."""
    if existing_id is None:
        return SagaError(
            f"saga id {new.saga_id} is already used by another saga; nothing was written",
            saga_id=new.saga_id,
        )
    if existing_hash != new.payload_hash:
        return PayloadConflictError(
            f"{new.name} {new.business_key!r} was already started with a "
            f"different payload (saga {existing_id}); nothing was written",
            saga_id=existing_id,
            business_key=new.business_key,
        )
    return None


def saga_fields(columns: dict[str, Any]) -> dict[str, Any]:
    """Saga columns as ``SagaRecord`` fields (``payload_hash`` is no field of it)."""
    fields = dict(columns)
    if "id" in fields:
        fields["saga_id"] = fields.pop("id")
    fields.pop("payload_hash", None)
    if "state" in fields:
        fields["state"] = SagaState(fields["state"])
    return fields


# -- the step rows -----------------------------------------------------------------------


def step_columns(changes: Sequence[StepChange], now: datetime) -> dict[int, dict[str, Any]]:
    """The columns written per step row, by index. A decision may change one step twice
    (``running→failed``, then ``failed→compensating``): its changes are merged in order
    into one write per row, as applying them one after the other would leave it."""
    merged: dict[int, dict[str, Any]] = {}
    for change in changes:
        merged.setdefault(change.index, {}).update(step_values(change, now))
    return merged


def new_step_columns(
    new: NewSaga, decision: Decision, now: datetime
) -> list[tuple[int, dict[str, Any]]]:
    """(index, columns) of every step row of a new saga: pending, then ``decision``'s
    changes."""
    changed = step_columns(decision.step_changes, now)
    return [
        (i, {"idx": i, "name": name, "status": StepStatus.PENDING.value, **changed.get(i, {})})
        for i, name in enumerate(new.step_names)
    ]


def step_fields(columns: dict[str, Any]) -> dict[str, Any]:
    """Step columns as ``StepRecord`` fields."""
    fields = dict(columns)
    if "idx" in fields:
        fields["index"] = fields.pop("idx")
    if "status" in fields:
        fields["status"] = StepStatus(fields["status"])
    return fields


def new_saga_record(new: NewSaga, decision: Decision, now: datetime) -> SagaRecord:
    """The saga record that ``new_saga_columns`` and ``new_step_columns`` insert."""
    return SagaRecord(
        **saga_fields(new_saga_columns(new, decision, now)),
        steps=tuple(
            StepRecord(**step_fields(columns))
            for _, columns in new_step_columns(new, decision, now)
        ),
    )


# -- the transition log and the outbox -----------------------------------------------------


def transition_rows(saga_id: str, decision: Decision, now: datetime) -> list[TransitionRecord]:
    """The transition log rows ``decision`` appends, in its order."""
    who = actor(decision)
    return [
        TransitionRecord(saga_id, now, t.step, t.old, t.new, t.reason, who)
        for t in decision.transitions
    ]


def outbox_columns(saga_id: str, message: OutboxMessage, now: datetime) -> dict[str, Any]:
    """The columns of a new outbox row: its ``key`` is the body's (a step's guard key,
    which tells the relay a worker took the message; None for other messages)."""
    body = dict(message.body)
    return {"saga_id": saga_id, "body": body, "created_at": now, "key": body.get("key")}


def consumes_unsent(fresh: bool) -> bool:
    """Whether the decision marks the saga's unsent outbox rows sent: the saga moved on,
    so the messages that moved it were delivered (the relay must not republish them).
    A new saga has none."""
    return not fresh


def written_messages(
    saga_id: str, messages: Sequence[OutboxMessage], ids: Sequence[int], now: datetime
) -> tuple[OutboxMessage, ...]:
    """The messages as written, with their new outbox ids."""
    return tuple(
        OutboxMessage(saga_id, message.body, id=new_id, created_at=now)
        for message, new_id in zip(messages, ids, strict=True)
    )


# -- step guards ---------------------------------------------------------------------------


def replaceable(recorded: GuardRecord | None) -> bool:
    """Whether a guard row may be (re)written: none yet, or only a ``started`` marker.
    A final outcome, once recorded, stays (the first one wins)."""
    return recorded is None or recorded.outcome == STARTED


def started_marker(key: str, now: datetime, delivery: str | None = None) -> GuardRecord:
    """The marker of a step a worker began (or began again: a redelivery), naming the
    delivery (Celery task id) that began it when one is known."""
    return GuardRecord(key, STARTED, delivery, recorded_at=now)


def with_current_start(record: SagaRecord, began_at: datetime | None) -> SagaRecord:
    """``record`` as a scan claims it: its current step flagged ``started`` when a worker
    is executing it right now (its guard says ``started``, recorded at ``began_at``).
    The scanner re-sends the others: a message that never reached a worker, or a reply
    lost after the outcome was recorded (the guard answers it)."""
    return replace(
        record,
        steps=tuple(
            replace(s, started=began_at is not None, began_at=began_at)
            if s.index == record.current_step
            else s
            for s in record.steps
        ),
    )


def guard_columns(guard: GuardRecord, now: datetime) -> dict[str, Any]:
    """The guard row that recording ``guard`` writes: its outcome, stamped ``now``."""
    return {
        "key": guard.key,
        "outcome": guard.outcome,
        "result": guard.result,
        "error": guard.error,
        "recorded_at": now,
    }


def recorded_guard(guard: GuardRecord, now: datetime) -> GuardRecord:
    """``guard_columns`` as a record."""
    return GuardRecord(**guard_columns(guard, now))


# -- the dead-letter entry (the moves other than ``dead``: ``machine.dead_letters``) -------


def buried_columns(change: DeadLetterChange, now: datetime) -> dict[str, Any]:
    """What a ``dead`` change sets on the step's entry, a new one or one dead again (a
    retried compensation failed again; its ``deaths`` then go one up)."""
    return {
        "status": DeadLetterStatus.DEAD.value,
        "attempts": change.attempts or 0,
        "error": change.error,
        "traceback": change.traceback,
        "updated_at": now,
        "resolved_at": None,
        "next_auto_retry_at": change.next_auto_retry_at,
    }


def new_entry_columns(
    saga_id: str, saga_name: str, step_name: str, change: DeadLetterChange, now: datetime
) -> dict[str, Any]:
    """The columns of the step's first entry (``dead``); the task name defaults to
    ``saga.step``, the payload to ``{}``."""
    return {
        "saga_id": saga_id,
        "saga_name": saga_name,
        "step": change.step,
        "step_name": step_name,
        "task_name": change.task_name or f"{saga_name}.{step_name}",
        "payload": change.payload if change.payload is not None else {},
        "created_at": now,
        "deaths": 1,
        **buried_columns(change, now),
    }


def auto_retry_claimable(current: DeadLetterRecord | None, seen: DeadLetterRecord) -> bool:
    """The compare-and-set of an automatic retry on ``auto_retries``: the entry is still
    dead and retried as often as when ``seen`` was read (two recovery workers never both
    retry it)."""
    return (
        current is not None
        and current.status == DeadLetterStatus.DEAD
        and current.auto_retries == seen.auto_retries
    )


def auto_retry_columns(seen: DeadLetterRecord, next_at: datetime) -> dict[str, Any]:
    """What claiming an automatic retry of ``seen`` sets: one retry more, the next one due
    at ``next_at``."""
    return {"auto_retries": seen.auto_retries + 1, "next_auto_retry_at": next_at}


def forgets_started_marker(status: str) -> bool:
    """Whether a dead-letter move to ``status`` drops the dead compensation's ``started``
    marker (failures are not recorded, so its guard still says started): a move to
    ``retrying`` does, so the scanner and the relay treat the retry's message like a fresh
    one. The marker's key: ``definition.idempotency_key(saga, step, "compensation")``."""
    return status == DeadLetterStatus.RETRYING


# -- retention -----------------------------------------------------------------------------

# how many of the oldest outbox rows one retention pass looks at, per row it may delete
OUTBOX_WINDOW_FACTOR = 4


def owned_guard_keys(saga_ids: Iterable[str], step_names: Iterable[tuple[str, str]]) -> set[str]:
    """Every guard key the sagas ``saga_ids`` can have written (what retention deletes),
    from ``(saga_id, step name)`` pairs: the names of their steps and of the steps their
    transitions name (a definition change may have renamed some)."""
    names: dict[str, list[str]] = {saga_id: [] for saga_id in saga_ids}
    for saga_id, name in step_names:
        names[saga_id].append(name)
    return set().union(*(guard_keys(saga_id, of) for saga_id, of in names.items()))


def sent_rows_deleted(
    oldest_first: Iterable[tuple[int, datetime | None, datetime | None]],
    sent_before: datetime,
    limit: int,
) -> list[int]:
    """The ids of the outbox rows a retention pass deletes, from ``(id, created_at,
    sent_at)`` oldest first: up to ``limit`` rows sent before ``sent_before``, among the
    oldest ``limit * OUTBOX_WINDOW_FACTOR`` rows (a pass never reads the whole table);
    none at all when the oldest row was created at or after ``sent_before``. Rows still
    unsent (the relay's) and rows sent recently are stepped over."""
    window = list(itertools.islice(oldest_first, limit * OUTBOX_WINDOW_FACTOR))
    if not window or window[0][1] is None or window[0][1] >= sent_before:
        return []
    sent = [i for i, _, sent_at in window if sent_at is not None and sent_at < sent_before]
    return sent[:limit]
