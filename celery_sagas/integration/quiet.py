"""Nothing periodic at INFO when nothing happened.

Beat sends the outbox relay and the scan every few seconds. At ``-l INFO`` Celery itself logs
each of them three times — beat's "Scheduler: Sending due task …", the worker's "Task …
received" and "Task … succeeded …: <return value>" — hundreds of lines an hour on an idle
deployment. :class:`PeriodicLineFilter` drops those lines for the library's periodic tasks
only (other tasks are untouched) unless the task acted: a "succeeded" line whose return value
is not all zeros is kept, and the library logs what the scan or relay did itself. With the
logger at DEBUG everything is kept.

It is a filter on Celery's loggers (not on handlers), installed by ``install(app, …)``, so it
works whatever handlers the application configured.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterable, Mapping
from typing import Any

# the loggers Celery writes the periodic lines to
LOGGERS = ("celery.beat", "celery.app.trace", "celery.worker.strategy")
SENDING = "Scheduler: Sending due task"
RECEIVED = "] received"
SUCCEEDED = "] succeeded in "


def did_nothing(return_value: Any) -> bool:
    """True if a periodic task's return value (as logged: its repr) reports no work: ``0``,
    ``None``, or a mapping whose values are all zero (pure)."""
    try:
        value = ast.literal_eval(return_value) if isinstance(return_value, str) else return_value
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False
    if isinstance(value, Mapping):
        return all(not v for v in value.values())
    return value is None or value == 0


def is_idle_line(record: logging.LogRecord, tasks: frozenset[str]) -> bool:
    """Is ``record`` one of Celery's INFO lines about a periodic task of ``tasks`` that did
    nothing? (pure)"""
    if record.levelno != logging.INFO or record.name not in LOGGERS:
        return False
    message = str(record.msg)
    if record.name == "celery.beat":
        args = record.args if isinstance(record.args, tuple) else ()
        return message.startswith(SENDING) and any(a in tasks for a in args)
    data = record.args if isinstance(record.args, Mapping) else getattr(record, "data", None)
    if not isinstance(data, Mapping) or data.get("name") not in tasks:
        return False
    if RECEIVED in message:
        return True
    return SUCCEEDED in message and did_nothing(data.get("return_value"))


class PeriodicLineFilter(logging.Filter):
    """Drops :func:`is_idle_line` records unless their logger is enabled for DEBUG."""

    def __init__(self, tasks: Iterable[str]) -> None:
        super().__init__()
        self.tasks = frozenset(tasks)

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_idle_line(record, self.tasks):
            return True
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_periodic_tasks(tasks: Iterable[str]) -> None:
    """Install (once per logger) the filter for ``tasks`` on Celery's loggers."""
    wanted = frozenset(tasks)
    for name in LOGGERS:
        target = logging.getLogger(name)
        found = [f for f in target.filters if isinstance(f, PeriodicLineFilter)]
        if found:
            found[0].tasks |= wanted
        else:
            target.addFilter(PeriodicLineFilter(wanted))
