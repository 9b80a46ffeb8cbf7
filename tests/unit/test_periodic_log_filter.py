"""The filter that keeps Celery's INFO lines about idle periodic tasks out of the log."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from celery_sagas.integration.quiet import (
    PeriodicLineFilter,
    did_nothing,
    is_idle_line,
    quiet_periodic_tasks,
)

TASKS = frozenset({"celery_sagas.scan", "celery_sagas.relay_outbox"})
RECEIVED = "Task %(name)s[%(id)s] received"
SUCCEEDED = "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s"


def record(logger: str, msg: str, args: Any, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(logger, level, __file__, 1, msg, args, None)


def task_line(msg: str, name: str, value: str = "0", logger: str = "celery.app.trace") -> Any:
    return record(logger, msg, ({"id": "1", "name": name, "runtime": 0.01, "return_value": value},))


@pytest.mark.parametrize(
    ("value", "idle"),
    [
        ("0", True),
        ("None", True),
        ("{'timed_out': 0, 'resent': 0, 'stuck': 0}", True),
        ("3", False),
        ("{'timed_out': 0, 'resent': 2}", False),
        ("<object at 0x1>", False),
    ],
)
def test_did_nothing(value: str, idle: bool) -> None:
    assert did_nothing(value) is idle


@pytest.mark.parametrize(
    ("line", "idle"),
    [
        (
            record(
                "celery.beat", "Scheduler: Sending due task %s (%s)", ("x", "celery_sagas.scan")
            ),
            True,
        ),
        (
            record("celery.beat", "Scheduler: Sending due task %s (%s)", ("x", "orders.report")),
            False,
        ),
        (task_line(RECEIVED, "celery_sagas.scan", logger="celery.worker.strategy"), True),
        (task_line(SUCCEEDED, "celery_sagas.relay_outbox", "0"), True),
        (task_line(SUCCEEDED, "celery_sagas.relay_outbox", "4"), False),
        (task_line(SUCCEEDED, "celery_sagas.scan", "{'timed_out': 1, 'resent': 0}"), False),
        (task_line(SUCCEEDED, "order_fulfillment.reserve_inventory", "0"), False),
        (task_line(RECEIVED, "order_fulfillment.start", logger="celery.worker.strategy"), False),
        (record("celery_sagas", "scan: %d timed out", (1,)), False),
    ],
)
def test_is_idle_line(line: logging.LogRecord, idle: bool) -> None:
    assert is_idle_line(line, TASKS) is idle
    assert PeriodicLineFilter(TASKS).filter(line) is not idle


def test_warnings_about_periodic_tasks_are_kept() -> None:
    line = task_line(SUCCEEDED, "celery_sagas.relay_outbox", "0")
    line.levelno = logging.WARNING
    assert not is_idle_line(line, TASKS)


def test_installed_once_per_logger_and_debug_keeps_everything() -> None:
    quiet_periodic_tasks(TASKS)
    quiet_periodic_tasks(TASKS)
    trace = logging.getLogger("celery.app.trace")
    filters = [f for f in trace.filters if isinstance(f, PeriodicLineFilter)]
    assert len(filters) == 1 and filters[0].tasks >= TASKS
    line = task_line(RECEIVED, "celery_sagas.scan")
    old = trace.level
    try:
        trace.setLevel(logging.DEBUG)
        assert filters[0].filter(line)
        trace.setLevel(logging.INFO)
        assert not filters[0].filter(line)
    finally:
        trace.setLevel(old)
