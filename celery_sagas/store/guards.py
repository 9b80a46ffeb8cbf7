"""Step guards, checked before a step runs and written after (keyed
``saga_id:step:action|compensation``); a ``started`` guard marks a step a worker is running,
and its ``result`` names the delivery (Celery task id) that began it, when one is known.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    cast,
    delete,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from celery_sagas.protocols import STARTED, GuardRecord, SagaRecord
from celery_sagas.records import EXPECTED_STATES
from celery_sagas.row_changes import guard_columns, recorded_guard
from celery_sagas.store.drivers import counted
from celery_sagas.store.records import JoinedLayout
from celery_sagas.store.tables import UtcDateTime, guards, sagas, stored_utc

GUARD_FIELDS = ("outcome", "result", "error", "recorded_at")


def get_guard(conn: Connection, key: str) -> GuardRecord | None:
    row = conn.execute(select(guards).where(guards.c.key == key)).one_or_none()
    return _guard_record(row) if row else None


def refresh_started(statement: Any) -> Any:
    """``statement`` (an INSERT of a ``started`` marker) as an upsert: a marker already
    there takes the new start time and delivery (a redelivery began it again); a final
    outcome stays."""
    return statement.on_conflict_do_update(
        index_elements=["key"],
        set_={"recorded_at": statement.excluded.recorded_at, "result": statement.excluded.result},
        where=guards.c.outcome == STARTED,
    )


def mark_started_statement(insert: Any) -> Any:
    """INSERT (or refresh) a ``started`` marker unless the key has a final outcome; built
    once per store (its parameters ``g_key``, ``g_now`` and ``g_delivery``: the delivery
    that began it, or None), since building costs more than running it."""
    values = {
        "key": bindparam("g_key"),
        "outcome": STARTED,
        "recorded_at": bindparam("g_now"),
        "result": bindparam("g_delivery", type_=JSON(none_as_null=True)),
    }
    return counted(refresh_started(insert.values(**values)))


def _expected(saga_id: Any) -> Any:
    """The saga waits for this message: live in the role's states, at step ``g_step``
    under token ``g_token``, in a state ``records.EXPECTED_STATES`` gives its role (as
    ``protocols.expects``)."""
    # equalities, not IN: an IN list expands at execution, which a prepared statement can't
    role = bindparam("g_role", type_=String)
    in_expected_state = or_(
        *(
            and_(role == r.value, or_(*(sagas.c.state == s.value for s in sorted(states))))
            for r, states in EXPECTED_STATES.items()
        )
    )
    return (
        select(sagas.c.id)
        .where(
            sagas.c.id == saga_id,
            sagas.c.current_step == bindparam("g_step", type_=Integer),
            sagas.c.token == bindparam("g_token", type_=Integer),
            # the worker runs the definition the saga started with (NULLs: either unknown)
            or_(
                sagas.c.definition.is_(None),
                sagas.c.definition
                == func.coalesce(bindparam("g_definition", type_=String), sagas.c.definition),
            ),
            in_expected_state,
        )
        .exists()
    )


def begin_step_statement(with_steps: Any) -> Any:
    """The saga-and-steps query (``with_steps``) plus, in the same statement (PostgreSQL:
    a data-modifying CTE, one snapshot), a ``started`` marker written only if that saga
    expects the message, and the guard row as it was. ``with_steps`` may carry the
    saga's payload in its first row only (the driver decodes it once, not per step)."""
    marker = select(
        bindparam("g_key", type_=String),
        literal(STARTED, type_=String),
        bindparam("g_now", type_=UtcDateTime()),
        # the delivery that began it, as a JSON string (NULL: not known)
        func.to_json(cast(bindparam("g_delivery", type_=String), String)),
    ).where(_expected(bindparam("p_saga_id")))
    columns = ["key", "outcome", "recorded_at", "result"]
    marked = (
        refresh_started(pg_insert(guards).from_select(columns, marker))
        .returning(guards.c.key)
        .cte("marked")
    )
    earlier = guards.alias("earlier")
    return (
        with_steps.add_columns(
            # losing this marker only means the scanner may re-send a running step: its
            # statement (its own transaction, in autocommit) need not wait for the WAL flush
            func.set_config("synchronous_commit", "off", True).label("g_async_commit"),
            select(func.count()).select_from(marked).scalar_subquery().label("g_marked"),
            *(earlier.c[name].label(f"g_{name}") for name in ("key", *GUARD_FIELDS)),
        )
        .outerjoin(earlier, earlier.c.key == bindparam("g_key"))
        .add_cte(marked)
    )


class Begun:
    """Reads the raw rows of ``begin_step_statement`` (by position: see ``JoinedLayout``)."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.saga = JoinedLayout(labels)
        at = {label: i for i, label in enumerate(labels)}
        self.marked = at["g_marked"]
        self.guard = tuple(at[f"g_{name}"] for name in ("key", *GUARD_FIELDS))

    def answer(self, rows: Sequence[Sequence[Any]]) -> tuple[GuardRecord | None, SagaRecord | None]:
        """``begin_guard``'s answer and the saga, from the (non-empty) rows (no marker
        written: the recorded outcome, if any)."""
        first = rows[0]
        key, outcome, result, error, recorded_at = (first[i] for i in self.guard)
        recorded = None
        if not first[self.marked] and outcome not in (None, STARTED):
            recorded = GuardRecord(key, outcome, result, error, stored_utc(recorded_at))
        return recorded, self.saga.record(rows)


def begin_guard(
    conn: Connection, mark_started: Any, key: str, now: datetime, delivery: str | None = None
) -> GuardRecord | None:
    """Mark ``key`` started by ``delivery`` (one statement; the caller runs it in
    autocommit). Returns the recorded final outcome of an earlier delivery, if there is one."""
    params = {"g_key": key, "g_now": now, "g_delivery": delivery}
    marked = conn.execute(mark_started, params).rowcount
    if marked:
        return None
    row = conn.execute(select(guards).where(guards.c.key == key)).one()
    return None if row.outcome == STARTED else _guard_record(row)


def hand_over_started(conn: Connection, key: str, delivery: str, to: str | None) -> bool:
    """The ``started`` marker of ``key`` that names ``delivery`` now names ``to`` (None:
    it is deleted, so the step counts as sent but not begun). True if there was one."""
    mine = and_(
        guards.c.key == key,
        guards.c.outcome == STARTED,
        cast(guards.c.result, Text) == json.dumps(delivery),
    )
    if to is None:
        changed = conn.execute(delete(guards).where(mine))
    else:
        changed = conn.execute(update(guards).where(mine).values(result=to))
    return bool(changed.rowcount)


def beat_started(conn: Connection, markers: Mapping[str, str | None], at: datetime) -> int:
    """Each ``started`` marker of ``markers`` still held by its delivery (None: by any)
    takes ``at`` as its time (``SagaStore.beat_started``)."""
    refreshed = 0
    for key, delivery in markers.items():
        held = [guards.c.key == key, guards.c.outcome == STARTED]
        if delivery is not None:
            held.append(cast(guards.c.result, Text) == json.dumps(delivery))
        refreshed += conn.execute(update(guards).where(*held).values(recorded_at=at)).rowcount
    return refreshed


def keep_first_final(statement: Any) -> Any:
    """``statement`` (an INSERT into the guards) as an upsert where the first final outcome
    wins: it replaces a ``started`` marker, never another final outcome."""
    return statement.on_conflict_do_update(
        index_elements=["key"],
        set_={name: statement.excluded[name] for name in GUARD_FIELDS},
        where=guards.c.outcome == STARTED,
    )


def record_guard(conn: Connection, insert: Any, guard: GuardRecord, now: datetime) -> bool:
    """Record a final outcome unless one is recorded already (one statement). True if this
    one was written."""
    written = conn.execute(counted(keep_first_final(insert.values(**guard_columns(guard, now)))))
    return bool(written.rowcount)


def put_guard(conn: Connection, insert: Any, guard: GuardRecord, now: datetime) -> GuardRecord:
    """Record a final outcome once; returns whichever record won."""
    if record_guard(conn, insert, guard, now):
        return recorded_guard(guard, now)
    row = conn.execute(select(guards).where(guards.c.key == guard.key)).one()
    return _guard_record(row)


def _guard_record(row: Any) -> GuardRecord:
    return GuardRecord(row.key, row.outcome, row.result, row.error, row.recorded_at)
