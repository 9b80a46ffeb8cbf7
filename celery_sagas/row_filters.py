"""Which rows a scan, a retention pass or the relay takes, as pure values: the one rule
that the SQL store turns into a WHERE clause (``store.filters.where``) and the in-memory
fake (``celery_sagas.testing``) tests on its records with ``holds``. No I/O, no SQLAlchemy.

A filter is a tuple of ``Condition``s on one table's columns (by their SQL names), all of
which must hold. A NULL column (None) satisfies no comparison, as in SQL. What needs
another table (an open dead letter, an unsent outbox row, a worker's guard) is not a
filter: each store writes that part its own way (an EXISTS subquery, a look-up).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from celery_sagas.machine import LIVE_STATES, TERMINAL_STATES, SagaState

Op = Literal["is", "is not", "==", "<", "<=", "in"]


@dataclass(frozen=True)
class Condition:
    """``column op value``; ``is``/``is not`` take None, True or False (SQL ``IS``)."""

    column: str
    op: Op
    value: Any = None


Filter = tuple[Condition, ...]

FINISHED = tuple(sorted(state.value for state in TERMINAL_STATES))
LIVE = tuple(sorted(state.value for state in LIVE_STATES))


_PYTHON: dict[Op, Callable[[Any, Any], Any]] = {
    "is": operator.is_,
    "is not": operator.is_not,
    "==": operator.eq,
    "<": operator.lt,
    "<=": operator.le,
    "in": lambda value, values: value in values,
}


def holds(conditions: Filter, row: Mapping[str, Any]) -> bool:
    """Whether ``row`` (column name → value) passes every condition."""
    return all(_holds(c, row[c.column]) for c in conditions)


def _holds(condition: Condition, value: Any) -> bool:
    if value is None and condition.op not in ("is", "is not"):
        return False  # NULL compares to nothing
    return bool(_PYTHON[condition.op](value, condition.value))


# -- the scanner's claims (saga table) -----------------------------------------------------


def due(now: datetime) -> Filter:
    """Sagas whose ``due_at`` has come (a step overdue, a deadline passed, a re-send)."""
    return (Condition("due_at", "is not"), Condition("due_at", "<=", now))


def waiting(name: str | None = None) -> Filter:
    """Never admitted and still STARTED (a saga that failed while waiting is not waiting),
    of type ``name`` (None: any)."""
    conditions = (
        Condition("admitted", "is", False),
        Condition("state", "==", SagaState.STARTED.value),
    )
    return conditions if name is None else (Condition("name", "==", name), *conditions)


def running(name: str) -> Filter:
    """Sagas of type ``name`` that hold a slot: admitted and not finished."""
    return (
        Condition("name", "==", name),
        Condition("admitted", "is", True),
        Condition("state", "in", LIVE),
    )


def stuck(older_than: datetime) -> Filter:
    """Sagas unfinished since before ``older_than``, not reported yet."""
    return (
        Condition("finished_at", "is"),
        Condition("created_at", "<", older_than),
        Condition("stuck_reported_at", "is"),
    )


# -- retention (saga table; the stores add: no open dead letter, or no unsent row) ----------


def prunable(finished_before: datetime, name: str | None) -> Filter:
    """COMPLETED or FAILED before ``finished_before`` (so created before it: bounds the
    ``created_at`` walk), of type ``name`` (None: any)."""
    conditions = (
        Condition("created_at", "<", finished_before),
        Condition("state", "in", FINISHED),
        Condition("finished_at", "<", finished_before),
    )
    return conditions if name is None else (*conditions, Condition("name", "==", name))


def compactable(finished_before: datetime) -> Filter:
    """Finished before ``finished_before``, not compacted yet."""
    return (
        Condition("finished_at", "is not"),
        Condition("compacted_at", "is"),
        Condition("finished_at", "<", finished_before),
    )


# -- the relay (an outbox table; the saga store adds: no worker took the message) -----------


def unsent(created_before: datetime) -> Filter:
    """Outbox rows not sent, written before ``created_before``."""
    return (Condition("sent_at", "is"), Condition("created_at", "<", created_before))
