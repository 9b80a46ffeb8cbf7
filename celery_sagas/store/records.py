"""Rows to records and back: ``SagaRecord``/``StepRecord`` from ``sagas`` and ``steps``
rows, the column values of a step status change, and the record of a saga just inserted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from celery_sagas.machine import Decision, ErrorKind, SagaState, StepStatus
from celery_sagas.protocols import NewSaga, SagaRecord, StepRecord
from celery_sagas.row_changes import new_saga_record
from celery_sagas.store.tables import steps, stored_utc

SAGA_FIELDS = (
    "id", "name", "business_key", "state", "current_step", "token", "version", "payload",
    "created_at", "updated_at", "reason", "finished_at", "deadline_at", "due_at", "admitted",
    "definition",
)  # fmt: skip
OPTIONAL_SAGA_FIELDS = frozenset({"definition"})
STEP_FIELDS = (
    "idx", "name", "status", "attempts", "compensation_attempts", "result", "error",
    "error_kind", "started_at", "finished_at", "compensation_started_at",
    "compensation_finished_at", "deadline_at", "redispatch_at", "dispatches",
)  # fmt: skip


def saga_from_values(values: Sequence[Any], step_records: tuple[StepRecord, ...]) -> SagaRecord:
    """The saga record from its column values in ``SAGA_FIELDS`` order (datetimes made UTC:
    the driver's raw values, or SQLAlchemy's already processed ones)."""
    (
        saga_id, name, business_key, state, current_step, token, version, payload,
        created_at, updated_at, reason, finished_at, deadline_at, due_at, admitted,
        definition,
    ) = values  # fmt: skip
    return SagaRecord(
        saga_id=saga_id,
        name=name,
        business_key=business_key,
        state=SagaState(state),
        current_step=current_step,
        token=token,
        version=version,
        payload=payload,
        created_at=stored_utc(created_at),
        updated_at=stored_utc(updated_at),
        reason=reason,
        finished_at=stored_utc(finished_at),
        deadline_at=stored_utc(deadline_at),
        due_at=stored_utc(due_at),
        admitted=admitted,
        definition=definition,
        steps=step_records,
    )


def step_from_values(values: Sequence[Any]) -> StepRecord:
    """The step record from its column values in ``STEP_FIELDS`` order."""
    (
        idx, name, status, attempts, compensation_attempts, result, error, error_kind,
        started_at, finished_at, compensation_started_at, compensation_finished_at,
        deadline_at, redispatch_at, dispatches,
    ) = values  # fmt: skip
    return StepRecord(
        index=idx,
        name=name,
        status=StepStatus(status),
        attempts=attempts,
        compensation_attempts=compensation_attempts,
        result=result,
        error=error,
        error_kind=ErrorKind(error_kind) if error_kind else None,
        started_at=stored_utc(started_at),
        finished_at=stored_utc(finished_at),
        compensation_started_at=stored_utc(compensation_started_at),
        compensation_finished_at=stored_utc(compensation_finished_at),
        deadline_at=stored_utc(deadline_at),
        redispatch_at=stored_utc(redispatch_at),
        dispatches=dispatches,
    )


def _step_record(row: Any) -> StepRecord:
    return step_from_values([getattr(row, name) for name in STEP_FIELDS])


STEP_PREFIX = "step_"
# the step columns of a saga-and-steps join, labelled apart from the saga's own
STEP_COLUMNS = tuple(c.label(STEP_PREFIX + c.name) for c in steps.c)


class _StepColumns:
    """One joined row seen as a step row (``row.idx`` reads ``step_idx``)."""

    __slots__ = ("row",)

    def __init__(self, row: Any) -> None:
        self.row = row

    def __getattr__(self, name: str) -> Any:
        return getattr(self.row, STEP_PREFIX + name)


def _joined_record(rows: Sequence[Any]) -> SagaRecord | None:
    """The saga record from the rows of a saga-and-steps join (None: no such saga)."""
    if not rows:
        return None
    return _saga_record(rows[0], [_StepColumns(r) for r in rows])


class JoinedLayout:
    """Where the saga's and the steps' columns sit in the raw rows of a saga-and-steps
    join (by label), to build the record straight from the driver's tuples: the hot
    path's read (``begin_step``) skips per-value result processing and row objects.
    Datetimes are made UTC here; JSON arrives decoded by the driver."""

    def __init__(self, labels: Sequence[str]) -> None:
        at = {label: i for i, label in enumerate(labels)}
        self.saga = tuple(at[name] for name in SAGA_FIELDS)
        self.step = tuple(at[STEP_PREFIX + name] for name in STEP_FIELDS)

    def record(self, rows: Sequence[Sequence[Any]]) -> SagaRecord | None:
        """The saga from its rows, steps in ``idx`` order (None: no rows, no saga)."""
        if not rows:
            return None
        step_records = tuple(step_from_values([row[i] for i in self.step]) for row in rows)
        return saga_from_values([rows[0][i] for i in self.saga], step_records)


def _saga_record(row: Any, step_rows: Sequence[Any] = ()) -> SagaRecord:
    """From a SQLAlchemy row (``definition`` may be left out of the select: None)."""
    values = [getattr(row, name, None) if name in OPTIONAL_SAGA_FIELDS else getattr(row, name)
              for name in SAGA_FIELDS]  # fmt: skip
    return saga_from_values(values, tuple(_step_record(r) for r in step_rows))


def _fresh_record(new: NewSaga, decision: Decision, now: datetime) -> SagaRecord:
    """The record just inserted (``row_changes.new_saga_record``), without reading it
    back: as the columns hand it back (UTC datetimes, the payload through JSON)."""
    stored = replace(
        new, payload=json.loads(json.dumps(new.payload)), deadline_at=_utc(new.deadline_at)
    )
    record = new_saga_record(stored, decision, now.astimezone(UTC))
    if all(_is_utc(s.deadline_at) and _is_utc(s.redispatch_at) for s in record.steps):
        return record  # the machine's times come from ``now``: UTC already
    return replace(
        record,
        steps=tuple(
            replace(s, deadline_at=_utc(s.deadline_at), redispatch_at=_utc(s.redispatch_at))
            for s in record.steps
        ),
    )


def _utc(moment: datetime | None) -> datetime | None:
    return moment.astimezone(UTC) if moment else None


def _is_utc(moment: datetime | None) -> bool:
    return moment is None or moment.tzinfo is UTC
