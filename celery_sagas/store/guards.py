"""Step guards, checked before a step runs and written after (keyed
``saga_id:step:action|compensation``); a ``started`` guard marks a step a worker is running.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from celery_sagas.protocols import STARTED, GuardRecord
from celery_sagas.store.tables import guards


def get_guard(conn: Connection, key: str) -> GuardRecord | None:
    row = conn.execute(select(guards).where(guards.c.key == key)).one_or_none()
    return _guard_record(row) if row else None


def begin_guard(
    conn: Connection, insert: Any, key: str, now: datetime, is_postgres: bool
) -> GuardRecord | None:
    if is_postgres:
        # Losing this marker only means the scanner may re-send a running step.
        conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
    inserted = conn.execute(
        insert.values(key=key, outcome=STARTED, recorded_at=now).on_conflict_do_nothing(
            index_elements=["key"]
        )
    ).rowcount
    if inserted:
        return None
    row = conn.execute(select(guards).where(guards.c.key == key)).one()
    return None if row.outcome == STARTED else _guard_record(row)


def put_guard(conn: Connection, insert: Any, guard: GuardRecord, now: datetime) -> GuardRecord:
    values = {
        "outcome": guard.outcome,
        "result": guard.result,
        "error": guard.error,
        "recorded_at": now,
    }
    updated = conn.execute(
        update(guards)
        .where(guards.c.key == guard.key, guards.c.outcome == STARTED)
        .values(**values)
    ).rowcount
    if not updated:
        updated = conn.execute(
            insert.values(key=guard.key, **values).on_conflict_do_nothing(index_elements=["key"])
        ).rowcount
    if updated:
        return GuardRecord(guard.key, guard.outcome, guard.result, guard.error, now)
    row = conn.execute(select(guards).where(guards.c.key == guard.key)).one()
    return _guard_record(row)


def _guard_record(row: Any) -> GuardRecord:
    return GuardRecord(row.key, row.outcome, row.result, row.error, row.recorded_at)
