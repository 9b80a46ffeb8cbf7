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


def after_commit(within: Any, callback: Callable[[], Any]) -> bool:
    """Run ``callback`` once the caller's ``Session`` commits (not if it rolls back).
    False for a ``Connection``: SQLAlchemy has no after-commit event on one, so the
    caller publishes (``handle.publish()``) or the relay does."""
    if not isinstance(within, Session):
        return False

    def committed(_: Session) -> None:
        forget()
        callback()

    def rolled_back(_: Session, __: Any = None) -> None:
        forget()

    def forget() -> None:
        for name, fn in (("after_commit", committed), ("after_rollback", rolled_back)):
            if event.contains(within, name, fn):
                event.remove(within, name, fn)

    event.listen(within, "after_commit", committed)
    event.listen(within, "after_rollback", rolled_back)
    return True
