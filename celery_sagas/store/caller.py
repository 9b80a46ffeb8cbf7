"""Starting a saga inside the caller's own transaction: a SQLAlchemy ``Connection`` or
``Session`` on the saga database, which then commits or rolls back the saga with the
application's own rows (the transactional outbox at the entrance)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.orm import Session

from celery_sagas.errors import SagaError


def connection_of(within: Any) -> Connection:
    """The connection of the caller's transaction (a ``Session``'s, begun if needed)."""
    if isinstance(within, Session):
        return within.connection()
    if isinstance(within, Connection):
        if not within.in_transaction():
            raise SagaError("connection=...: begin a transaction first (engine.begin())")
        return within
    raise SagaError(
        f"connection= must be a SQLAlchemy Connection or Session, got {type(within).__name__}"
    )


PENDING = "celery_sagas_after_commit"


def after_commit(within: Any, callback: Callable[[], Any]) -> bool:
    """Run ``callback`` once the caller's ``Session`` commits (dropped if it rolls back).
    False for a ``Connection``: SQLAlchemy has no after-commit event on one, so the
    caller publishes (``handle.publish()``) or the relay does."""
    if not isinstance(within, Session):
        return False
    pending: list[Callable[[], Any]] | None = within.info.get(PENDING)
    if pending is None:  # one pair of listeners per session, never removed mid-dispatch
        pending = within.info[PENDING] = []
        event.listen(within, "after_commit", _run_pending)
        event.listen(within, "after_rollback", _drop_pending)
    pending.append(callback)
    return True


def _run_pending(session: Session) -> None:
    callbacks = list(session.info.get(PENDING) or ())
    session.info[PENDING] = []
    for callback in callbacks:
        callback()


def _drop_pending(session: Session) -> None:
    session.info[PENDING] = []
