"""Run-once claims for outcome hooks, on the guards table (key ``saga_id:hook:hook``).

A claim is a ``started`` guard row with a lease: the first delivery takes it, a duplicate
finds it taken (``busy``) or finished (``done``), and a delivery after the lease ran out
(the worker that held it died) takes it over.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Connection, delete, select, update

from celery_sagas.protocols import STARTED
from celery_sagas.store.backends import Backend
from celery_sagas.store.tables import guards, outbox

Claimed = Literal["run", "busy", "done"]


def claim(conn: Connection, backend: Backend, key: str, now: datetime, lease: float) -> Claimed:
    statement = (
        backend.insert(guards)
        .values(key=key, outcome=STARTED, recorded_at=now)
        .on_conflict_do_update(
            index_elements=["key"],
            set_={"recorded_at": now},
            where=(guards.c.outcome == STARTED)
            & (guards.c.recorded_at < now - timedelta(seconds=lease)),
        )
        .returning(guards.c.key)
    )
    if conn.execute(statement).first() is not None:
        return "run"
    outcome = conn.execute(select(guards.c.outcome).where(guards.c.key == key)).scalar_one()
    return "busy" if outcome == STARTED else "done"


def release(conn: Connection, key: str) -> None:
    """Give a claim back (the hook raised): the next delivery may run it."""
    conn.execute(delete(guards).where(guards.c.key == key, guards.c.outcome == STARTED))


def finish(conn: Connection, key: str, saga_id: str, now: datetime) -> None:
    """The claimed work is done: the guard says so and its outbox row is marked sent (the
    relay re-drives a hook message only until a delivery has claimed it)."""
    conn.execute(update(guards).where(guards.c.key == key).values(outcome="ok", recorded_at=now))
    conn.execute(
        update(outbox)
        .where(outbox.c.saga_id == saga_id, outbox.c.key == key, outbox.c.sent_at.is_(None))
        .values(sent_at=now)
    )
