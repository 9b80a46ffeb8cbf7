"""What the saga page shows, as values: the timeline, the compensation order, the operator
actions, the diagram, the redacted payload and results (:func:`read_detail`, from the store),
and the saga's tasks as Flower's in-memory events know them (:func:`saga_tasks`).

Blocking reads run in an executor from the handlers in ``integration/flower.py``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from flower.utils.search import QuerySyntaxError
from flower.utils.tasks import iter_tasks

from celery_sagas.choreography import by_operator
from celery_sagas.definition import Saga, SagaRegistry
from celery_sagas.integration.diagram import phases, render_svg
from celery_sagas.integration.dispatcher import ADVANCE_TASK, COMPENSATED_TASK, DEAD_LETTER_TASK
from celery_sagas.machine import Role
from celery_sagas.protocols import DeadLetterRecord, SagaRecord, StepRecord, TransitionRecord
from celery_sagas.redaction import redact

# --------------------------------------------------------------------------- view model


def when(value: datetime | None) -> str:
    """A timestamp as shown on the pages: UTC, milliseconds."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if value else "-"


def clock(value: datetime | None) -> str:
    """Time of day (UTC, milliseconds): the date is in the page's header."""
    return value.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3] if value else "-"


def as_json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, default=str, ensure_ascii=False)


def took(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = (end - start).total_seconds()
    return f"{seconds:.3f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


@dataclass(frozen=True)
class TaskLink:
    """One task of the saga as Flower's events know it."""

    uuid: str
    name: str
    state: str
    step: int | None
    role: str  # start | action | advance | compensation | compensated | dead letter | other
    received: datetime | None
    runtime: float | None
    retries: int
    root_id: str | None


@dataclass(frozen=True)
class TimelineRow:
    offset: str
    at: datetime
    step: str
    old: str
    new: str
    reason: str
    actor: str
    phase: str  # saga | forward | compensation


def timeline(log: Sequence[TransitionRecord]) -> list[TimelineRow]:
    start = log[0].at if log else None
    rows = []
    for t in log:
        if t.step is None:
            phase = "saga"
        else:
            phase = "compensation" if t.new.startswith("compensat") else "forward"
        offset = f"+{(t.at - start).total_seconds():.3f}s" if start else ""
        rows.append(
            TimelineRow(
                offset, t.at, t.step or "(saga)", t.old, t.new, t.reason or "", t.actor, phase
            )
        )
    return rows


def compensation_order(log: Sequence[TransitionRecord]) -> list[str]:
    """The steps in the order their compensations finished."""
    return [t.step for t in log if t.step and t.new == "compensated"]


def operator_actions(log: Sequence[TransitionRecord]) -> list[TransitionRecord]:
    return [t for t in log if by_operator(t.actor)]


def step_tasks(tasks: Sequence[TaskLink], step: StepRecord, roles: set[str]) -> list[TaskLink]:
    return [t for t in tasks if t.step == step.index and t.role in roles]


@dataclass(frozen=True)
class SagaDetail:
    record: SagaRecord
    payload: Any
    results: Mapping[str, Any]
    timeline: list[TimelineRow]
    compensations: list[str]
    operator_actions: list[TransitionRecord]
    dead_letters: Sequence[DeadLetterRecord]
    diagram: str = ""  # SVG, every string in it escaped
    definition_installed: bool = True  # False: another version's workers must finish it


class SagaReader(Protocol):
    """What the pages read (``SqlSagaStore`` has it)."""

    engine: Any

    def find(self, ref: str) -> SagaRecord | None: ...

    def transitions(self, saga_id: str) -> Sequence[TransitionRecord]: ...

    def dead_letters(
        self, saga_id: str | None = None, status: str | None = None, limit: int = 100
    ) -> Sequence[DeadLetterRecord]: ...


def definition_of(record: SagaRecord, sagas: Mapping[str, Saga]) -> Saga | None:
    """The installed definition the saga started with (None: not installed here)."""
    if isinstance(sagas, SagaRegistry):
        return sagas.for_fingerprint(record.name, record.definition)
    return sagas.get(record.name)


def diagram_of(record: SagaRecord, sagas: Mapping[str, Saga]) -> str:
    saga = definition_of(record, sagas)
    names = [s.compensation_name or "" for s in saga.steps] if saga else []
    return render_svg(phases(record.steps), names)


def read_detail(
    store: SagaReader,
    ref: str,
    redact_fields: Sequence[str],
    sagas: Mapping[str, Saga] | None = None,
    choreographies: Collection[str] = (),
) -> SagaDetail | None:
    """Everything the saga page shows from the database (blocking: run in an executor).
    A choreographed saga (of ``choreographies``) has no steps: its timeline is its events."""
    record = store.find(ref)
    if record is None:
        return None
    log = store.transitions(record.saga_id)
    return SagaDetail(
        record=record,
        payload=redact(dict(record.payload), redact_fields),
        results={s.name: redact(s.result, redact_fields) for s in record.steps},
        timeline=timeline(log),
        compensations=compensation_order(log),
        operator_actions=operator_actions(log),
        dead_letters=[
            dataclasses.replace(e, payload=redact(e.payload, redact_fields))
            for e in store.dead_letters(saga_id=record.saga_id, status="all")
        ],
        diagram=diagram_of(record, sagas or {}),
        definition_installed=sagas is None
        or record.name in choreographies
        or definition_of(record, sagas) is not None,
    )


# --------------------------------------------------------------------------- Flower's tasks


def search_term(saga_id: str) -> str:
    """Flower's search for the tasks that carry ``saga_id`` in their kwargs."""
    return f"kwargs:saga_id={saga_id}"


def _task_roles(sagas: Mapping[str, Saga]) -> dict[str, tuple[str, int | None]]:
    roles: dict[str, tuple[str, int | None]] = {
        ADVANCE_TASK: ("advance", None),
        COMPENSATED_TASK: ("compensated", None),
        DEAD_LETTER_TASK: ("dead letter", None),
    }
    for saga in sagas.values():
        roles[f"{saga.name}.start"] = ("start", None)
        for index in range(len(saga.steps)):
            roles[saga.step_task_name(index)] = (Role.ACTION, index)
            roles[saga.compensation_task_name(index)] = (Role.COMPENSATION, index)
    return roles


def _kwargs_step(kwargs: Any) -> int | None:
    try:
        parsed = ast.literal_eval(kwargs) if isinstance(kwargs, str) else kwargs
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    step = parsed.get("step") if isinstance(parsed, dict) else None
    return step if isinstance(step, int) else None


def _timestamp(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int | float) else None


def saga_tasks(events: Any, saga_id: str, sagas: Mapping[str, Saga]) -> list[TaskLink]:
    """The saga's tasks in Flower's in-memory events state, oldest first; the root task
    (the start task, which runs before the saga id exists) is found through ``root_id``."""
    roles = _task_roles(sagas)
    try:
        found = dict(iter_tasks(events, search=search_term(saga_id), sort_by="received"))
    except QuerySyntaxError:
        return []
    for root_id in {getattr(t, "root_id", None) for t in found.values()} - {None, *found}:
        root = events.state.tasks.get(root_id)
        if root is not None:
            found = {root_id: root, **found}
    links = []
    for uuid, task in found.items():
        name = getattr(task, "name", None) or "?"
        role, step = roles.get(name, ("other", None))
        links.append(
            TaskLink(
                uuid=uuid,
                name=name,
                state=getattr(task, "state", None) or "?",
                step=step if step is not None else _kwargs_step(getattr(task, "kwargs", None)),
                role=role,
                received=_timestamp(getattr(task, "received", None)),
                runtime=getattr(task, "runtime", None),
                retries=getattr(task, "retries", None) or 0,
                root_id=getattr(task, "root_id", None),
            )
        )
    return links
