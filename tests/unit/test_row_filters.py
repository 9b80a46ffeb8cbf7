"""``row_filters``: which rows a scan, a retention pass or the relay takes, the one rule the
SQL store turns into a WHERE clause and the in-memory fake tests on its records. Tables of
rows and whether they pass, and the SQL each condition compiles to (no database needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import psycopg2

from celery_sagas import row_filters
from celery_sagas.row_filters import Condition, holds
from celery_sagas.store.filters import where
from celery_sagas.store.tables import outbox, sagas

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
BEFORE = NOW - timedelta(seconds=1)


@pytest.mark.parametrize(
    ("condition", "value", "passes"),
    [
        (Condition("c", "is"), None, True),
        (Condition("c", "is"), NOW, False),
        (Condition("c", "is not"), NOW, True),
        (Condition("c", "is", False), False, True),
        (Condition("c", "is", False), True, False),
        (Condition("c", "==", "a"), "a", True),
        (Condition("c", "<", NOW), BEFORE, True),
        (Condition("c", "<", NOW), NOW, False),
        (Condition("c", "<=", NOW), NOW, True),
        (Condition("c", "in", ("a", "b")), "b", True),
        (Condition("c", "in", ("a", "b")), "c", False),
        # NULL compares to nothing, as in SQL
        (Condition("c", "==", "a"), None, False),
        (Condition("c", "<", NOW), None, False),
        (Condition("c", "<=", NOW), None, False),
        (Condition("c", "in", ("a",)), None, False),
    ],
)
def test_a_condition_holds_as_sql_would_have_it(
    condition: Condition, value: Any, passes: bool
) -> None:
    assert holds((condition,), {"c": value}) is passes


def _row(**columns: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": "toy",
        "state": "PENDING",
        "admitted": True,
        "created_at": BEFORE - timedelta(hours=1),
        "finished_at": None,
        "due_at": None,
        "stuck_reported_at": None,
        "compacted_at": None,
    }
    return {**row, **columns}


@pytest.mark.parametrize(
    ("rule", "row", "passes"),
    [
        (row_filters.due(NOW), _row(due_at=NOW), True),
        (row_filters.due(NOW), _row(due_at=NOW + timedelta(seconds=1)), False),
        (row_filters.due(NOW), _row(), False),
        (row_filters.waiting(), _row(admitted=False, state="STARTED"), True),
        (row_filters.waiting("toy"), _row(admitted=False, state="STARTED"), True),
        (row_filters.waiting("other"), _row(admitted=False, state="STARTED"), False),
        (row_filters.waiting(), _row(admitted=False, state="FAILED"), False),
        (row_filters.waiting(), _row(state="STARTED"), False),
        (row_filters.running("toy"), _row(), True),
        (row_filters.running("toy"), _row(state="COMPLETED"), False),
        (row_filters.running("toy"), _row(admitted=False), False),
        (row_filters.stuck(NOW), _row(), True),
        (row_filters.stuck(NOW), _row(stuck_reported_at=BEFORE), False),
        (row_filters.stuck(NOW), _row(finished_at=BEFORE), False),
        (row_filters.prunable(NOW, None), _row(state="COMPLETED", finished_at=BEFORE), True),
        (row_filters.prunable(NOW, "toy"), _row(state="FAILED", finished_at=BEFORE), True),
        (row_filters.prunable(NOW, "other"), _row(state="FAILED", finished_at=BEFORE), False),
        (row_filters.prunable(NOW, None), _row(state="COMPLETED", finished_at=NOW), False),
        (row_filters.prunable(NOW, None), _row(state="COMPENSATION_FAILED"), False),
        (row_filters.compactable(NOW), _row(state="COMPLETED", finished_at=BEFORE), True),
        (row_filters.compactable(NOW), _row(finished_at=BEFORE, compacted_at=NOW), False),
        (row_filters.compactable(NOW), _row(), False),
        (row_filters.unsent(NOW), {"sent_at": None, "created_at": BEFORE}, True),
        (row_filters.unsent(NOW), {"sent_at": BEFORE, "created_at": BEFORE}, False),
        (row_filters.unsent(NOW), {"sent_at": None, "created_at": NOW}, False),
    ],
)
def test_each_filter_takes_the_rows_its_rule_names(
    rule: row_filters.Filter, row: dict[str, Any], passes: bool
) -> None:
    assert holds(rule, row) is passes


@pytest.mark.parametrize(
    ("dialect", "expected"),
    [
        (
            psycopg2.dialect(),
            "saga.finished_at IS NULL AND saga.admitted IS false AND saga.due_at IS NOT NULL"
            " AND saga.name = %(name_1)s AND saga.created_at < %(created_at_1)s"
            " AND saga.due_at <= %(due_at_1)s AND saga.state IN (__[POSTCOMPILE_state_1])",
        ),
        (
            sqlite.dialect(),
            "saga.finished_at IS NULL AND saga.admitted IS 0 AND saga.due_at IS NOT NULL"
            " AND saga.name = ? AND saga.created_at < ? AND saga.due_at <= ?"
            " AND saga.state IN (__[POSTCOMPILE_state_1])",
        ),
    ],
)
def test_each_condition_is_its_sql_clause(dialect: Any, expected: str) -> None:
    conditions = (
        Condition("finished_at", "is"),
        Condition("admitted", "is", False),
        Condition("due_at", "is not"),
        Condition("name", "==", "toy"),
        Condition("created_at", "<", NOW),
        Condition("due_at", "<=", NOW),
        Condition("state", "in", ("A", "B")),
    )
    sql = str(select(sagas.c.id).where(*where(sagas, conditions)).compile(dialect=dialect))
    assert sql.split("WHERE ", 1)[1] == expected


def test_a_filter_applies_to_any_table_with_its_columns() -> None:
    sql = str(select(outbox.c.id).where(*where(outbox, row_filters.unsent(NOW))))
    assert "saga_outbox.sent_at IS NULL AND saga_outbox.created_at < " in sql
