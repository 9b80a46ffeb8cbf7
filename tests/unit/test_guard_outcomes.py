"""``GuardOutcome``: the guard row's strings as an enum, ``STARTED`` still importable where
the stores import it from, and a record built from a column's plain string typed too."""

from __future__ import annotations

import json

import pytest

from celery_sagas import protocols, records
from celery_sagas.machine import Role, SagaState
from celery_sagas.records import STARTED, GuardOutcome, GuardRecord


def test_the_values_are_the_guard_table_strings() -> None:
    assert [o.value for o in GuardOutcome] == ["started", "ok", "business", "error"]
    assert json.dumps(list(GuardOutcome)) == '["started", "ok", "business", "error"]'


def test_started_is_the_enum_member_wherever_it_is_imported_from() -> None:
    assert records.STARTED is protocols.STARTED is GuardOutcome.STARTED
    assert STARTED == "started" and f"{STARTED}" == "started"


@pytest.mark.parametrize("text", ["started", "ok", "business", "error"])
def test_a_record_from_a_column_string_holds_the_enum(text: str) -> None:
    record = GuardRecord("s:step:action", text)  # type: ignore[arg-type]
    assert record.outcome is GuardOutcome(text)
    assert record == GuardRecord("s:step:action", GuardOutcome(text))


def test_an_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="'maybe'"):
        GuardRecord("s:step:action", "maybe")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("role", "states"),
    [
        (Role.ACTION, {SagaState.STARTED, SagaState.PENDING}),
        (Role.COMPENSATION, {SagaState.COMPENSATING}),
    ],
)
def test_the_states_that_expect_each_role(role: Role, states: set[SagaState]) -> None:
    assert records.EXPECTED_STATES[role] == states
    assert records.Expectation(0, 1, role).states == states
