"""PostgreSQL: a whole transition written in ONE statement, one round trip.

The hot path of a saga (a step's outcome applied, the next step's message written) is
load → decide → write. On PostgreSQL the write is a chain of data-modifying CTEs, all
gated on the compare-and-set of the saga row: every sub-statement takes the saga id from
``UPDATE saga … WHERE version = :read_version RETURNING id``, so if the saga changed since
it was read nothing at all is written and the caller retries with a fresh load. A single
statement is a single transaction, run in autocommit: no BEGIN, no COMMIT round trips.

It writes exactly what ``writes.update_saga`` + ``writes.write_decision`` write (the step
changes, transition rows, the consumed messages marked, new outbox rows, and the step's
guard), except a dead-letter change, which takes the ordinary transaction.

Building a statement this size costs more Python than running it, so a statement is built
once per *shape* (which columns change, how many rows of each kind) with bound parameters
and reused; the values of one decision are only a parameter dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    Dialect,
    Integer,
    Select,
    String,
    Text,
    bindparam,
    cast,
    exists,
    func,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from celery_sagas.machine import Decision
from celery_sagas.protocols import GuardRecord, NewSaga, OutboxMessage, SagaRecord
from celery_sagas.row_changes import (
    actor,
    changed_since,
    guard_columns,
    new_saga_columns,
    new_step_columns,
    outbox_columns,
    saga_columns,
    step_columns,
    written_messages,
)
from celery_sagas.store.guards import GUARD_FIELDS, keep_first_final
from celery_sagas.store.prepared import Prepared
from celery_sagas.store.tables import UtcDateTime, guards, outbox, sagas, steps, transitions

TRANSITION_FIELDS = ("step", "old", "new", "reason")


def fits(decision: Decision) -> bool:
    """Whether ``decision`` can be written as one statement (a dead-letter change cannot)."""
    return decision.accepted and decision.dead_letter is None


@dataclass(frozen=True)
class Shape:
    """What a statement's text depends on (not the values)."""

    create: bool  # INSERT the saga and its steps (else: UPDATE the saga and step changes)
    saga_columns: tuple[str, ...]
    step_columns: tuple[tuple[str, ...], ...]  # per step row written
    transitions: int
    guard: bool
    messages: int


def _param(name: str, type_: Any, value: Any = None) -> Any:
    """A typed bound parameter in a SELECT list (cast: PostgreSQL must know the type)."""
    return cast(bindparam(name, value, type_=type_), type_)


def _transitions(count: int, moved: Any, at: Any) -> Any:
    """One INSERT for the transition rows, in the decision's order (ids follow it)."""
    rows = [
        select(
            _param(f"t{n}_n", Integer(), n).label("n"),
            *(_param(f"t{n}_{name}", Text()).label(name) for name in TRANSITION_FIELDS),
        )
        for n in range(count)
    ]
    logged = (rows[0] if count == 1 else union_all(*rows)).subquery()
    ordered = (
        select(moved.c.id, at, *(logged.c[name] for name in TRANSITION_FIELDS))
        .add_columns(_param("p_actor", String()))
        .select_from(logged.join(moved, true()))  # moved: one row, or none (nothing written)
        .order_by(logged.c.n)
    )
    columns = ["saga_id", "at", *TRANSITION_FIELDS, "actor"]
    return transitions.insert().from_select(columns, ordered)


def _saga_written(shape: Shape) -> Any:
    """The gate: the saga row inserted (nothing if its id or business key exists) or
    moved by compare-and-set; its id, or no row."""
    values: dict[str, Any] = {c: bindparam(f"s_{c}") for c in shape.saga_columns}
    if shape.create:
        return pg_insert(sagas).values(**values).on_conflict_do_nothing().returning(sagas.c.id)
    return (
        update(sagas)
        .where(sagas.c.id == bindparam("p_saga_id"), sagas.c.version == bindparam("p_version"))
        .values(**values)
        .returning(sagas.c.id)
    )


def _step_written(shape: Shape, n: int, moved: Any) -> Any:
    columns = shape.step_columns[n]
    if shape.create:
        row = select(moved.c.id, *(_param(f"c{n}_{c}", steps.c[c].type) for c in columns))
        return steps.insert().from_select(["saga_id", *columns], row)
    moved_id = select(moved.c.id).scalar_subquery()
    return (
        update(steps)
        .where(steps.c.saga_id == moved_id, steps.c.idx == bindparam(f"c{n}_idx"))
        .values(**{c: bindparam(f"c{n}_{c}") for c in columns})
    )


@lru_cache(maxsize=512)
def statement(shape: Shape) -> Select[Any]:
    """SELECT <saga rows written (0 or 1)>, <new outbox ids…> WITH <every write>."""
    moved = _saga_written(shape).cte("moved")
    at = _param("now", UtcDateTime())
    writes: list[Any] = [
        _step_written(shape, n, moved).cte(f"step_{n}") for n in range(len(shape.step_columns))
    ]
    if shape.transitions:
        writes.append(_transitions(shape.transitions, moved, at).cte("logged"))
    if not shape.create:
        # the saga moved on, so the messages that moved it were delivered
        writes.append(
            update(outbox)
            .where(
                outbox.c.saga_id == select(moved.c.id).scalar_subquery(),
                outbox.c.sent_at.is_(None),
            )
            .values(sent_at=bindparam("consumed_at"))
            .cte("consumed")
        )
    if shape.guard:
        row = select(
            _param("g_key", String()),
            _param("g_outcome", String()),
            _param("g_result", JSON()),
            _param("g_error", Text()),
            at,
        ).where(exists(select(moved.c.id)))
        recorded = pg_insert(guards).from_select(["key", *GUARD_FIELDS], row)
        writes.append(keep_first_final(recorded).cte("guard"))
    new_ids = []
    for n in range(shape.messages):
        row = select(moved.c.id, _param(f"m{n}_body", JSON()), at, _param(f"m{n}_key", String()))
        written = (
            outbox.insert()
            .from_select(["saga_id", "body", "created_at", "key"], row)
            .returning(outbox.c.id)
            .cte(f"message_{n}")
        )
        writes.append(written)
        new_ids.append(select(written.c.id).scalar_subquery().label(f"message_{n}"))
    moved_count = select(func.count()).select_from(moved).scalar_subquery().label("moved")
    return select(moved_count, *new_ids).add_cte(moved, *writes)


@lru_cache(maxsize=512)
def prepared(shape: Shape, dialect: Dialect, enabled: bool) -> Prepared:
    return Prepared(statement(shape), dialect, enabled)


def shape_and_parameters(
    saga: SagaRecord | NewSaga,
    decision: Decision,
    messages: Sequence[OutboxMessage],
    now: datetime,
    guard: GuardRecord | None = None,
) -> tuple[Shape, dict[str, Any]]:
    """The statement's shape and its parameters: for an existing saga (``SagaRecord``)
    or a new one (``NewSaga``)."""
    new = saga if isinstance(saga, NewSaga) else None
    if new is None:
        assert isinstance(saga, SagaRecord)
        saga_row = saga_columns(saga, decision, now)
        # one write per step row: two UPDATEs of one row in one statement would keep
        # only one of them (``step_columns`` merges a step's changes)
        step_rows = list(step_columns(decision.step_changes, now).items())
        params: dict[str, Any] = {"p_saga_id": saga.saga_id, "p_version": saga.version}
    else:
        saga_row = new_saga_columns(new, decision, now)
        step_rows = new_step_columns(new, decision, now)
        params = {}
    params.update(now=now, consumed_at=now, p_actor=actor(decision))
    params.update({f"s_{c}": v for c, v in saga_row.items()})
    step_shapes = []
    for n, (index, values) in enumerate(step_rows):
        step_shapes.append(tuple(values))
        params[f"c{n}_idx"] = index
        params.update({f"c{n}_{c}": v for c, v in values.items()})
    for n, t in enumerate(decision.transitions):
        params.update({f"t{n}_step": t.step, f"t{n}_old": t.old, f"t{n}_new": t.new})
        params[f"t{n}_reason"] = t.reason
    if guard is not None:
        values = guard_columns(guard, now)
        params.update({f"g_{name}": values[name] for name in ("key", "outcome", "result")})
        params["g_error"] = values["error"]
    for n, message in enumerate(messages):
        row = outbox_columns(saga.saga_id, message, now)
        params[f"m{n}_body"] = row["body"]
        params[f"m{n}_key"] = row["key"]
    shape = Shape(
        create=new is not None,
        saga_columns=tuple(saga_row),
        step_columns=tuple(step_shapes),
        transitions=len(decision.transitions),
        guard=guard is not None,
        messages=len(messages),
    )
    return shape, params


def _run(
    conn: Connection,
    saga: SagaRecord | NewSaga,
    decision: Decision,
    messages: Sequence[OutboxMessage],
    now: datetime,
    guard: GuardRecord | None = None,
    prepare: bool = True,
) -> tuple[OutboxMessage, ...] | None:
    """Run the statement: the outbox messages written, or None if the gate wrote nothing
    (then nothing at all was written). ``prepare``: as a server-side prepared statement."""
    shape, params = shape_and_parameters(saga, decision, messages, now, guard)
    (row,) = prepared(shape, conn.dialect, prepare).rows(conn, params)
    if row.moved != 1:
        return None
    return written_messages(saga.saga_id, messages, tuple(row[1:]), now)


def write(
    conn: Connection,
    saga: SagaRecord,
    decision: Decision,
    messages: Sequence[OutboxMessage],
    now: datetime,
    guard: GuardRecord | None,
    prepare: bool = True,
) -> tuple[OutboxMessage, ...]:
    """Write ``decision``; ``ConcurrentUpdateError`` if the saga changed since it was read
    (then nothing was written)."""
    written = _run(conn, saga, decision, messages, now, guard, prepare)
    if written is None:
        raise changed_since(saga)
    return written


def create(
    conn: Connection,
    new: NewSaga,
    decision: Decision,
    messages: Sequence[OutboxMessage],
    now: datetime,
    prepare: bool = True,
) -> tuple[OutboxMessage, ...] | None:
    """Insert a new saga, its steps, transitions and first messages; None if its id or
    business key exists already (then nothing was written)."""
    return _run(conn, new, decision, messages, now, prepare=prepare)
