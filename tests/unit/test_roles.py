"""``Role``: the step roles are an enum in the code and the same bytes on the wire and in
the database as the strings they replaced (a rolling deploy mixes old and new workers)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from celery_sagas.coordinator import build_message
from celery_sagas.definition import Saga, Step, guard_keys, hook_key, idempotency_key
from celery_sagas.machine import Decision, Role, RunCompensation, RunStep, SagaState, StepStatus
from celery_sagas.records import Expectation, SagaRecord, StepRecord, current_execution_key

SAGA = Saga("orders", [Step("reserve", lambda ctx: 1, lambda ctx: None)])
NOW = datetime(2026, 1, 1, tzinfo=UTC)
DECISION = Decision(accepted=True, state=SagaState.STARTED, current_step=0, token=1)


def test_the_values_are_the_strings_on_the_wire() -> None:
    assert [role.value for role in Role] == ["action", "compensation"]
    assert json.dumps([Role.ACTION, Role.COMPENSATION]) == '["action", "compensation"]'


@pytest.mark.parametrize("role", list(Role))
def test_the_guard_key_is_unchanged(role: Role) -> None:
    key = idempotency_key("s-1", "reserve", role)
    assert key == f"s-1:reserve:{role.value}"
    assert type(key) is str


def test_guard_keys_cover_every_role() -> None:
    hooks = {hook_key("s-1", "on_completed"), hook_key("s-1", "on_failed")}
    expected = {idempotency_key("s-1", "reserve", role) for role in Role}
    assert guard_keys("s-1", ["reserve"]) == expected | hooks


@pytest.mark.parametrize(
    ("command", "kind"), [(RunStep(0, 1), "action"), (RunCompensation(0, 2), "compensation")]
)
def test_a_step_message_carries_the_role_as_a_plain_string(command: object, kind: str) -> None:
    body = build_message(SAGA, None, "s-1", {}, DECISION, command).body  # type: ignore[arg-type]
    assert type(body["kind"]) is str and body["kind"] == kind
    assert body["key"] == f"s-1:reserve:{kind}"
    assert json.loads(json.dumps(body))["kind"] == kind


@pytest.mark.parametrize("role", list(Role))
def test_an_expectation_read_from_the_wire_string_matches_the_enum(role: Role) -> None:
    assert Expectation(0, 1, Role(role.value)).states == Expectation(0, 1, role).states
    assert Role(role.value) is role


@pytest.mark.parametrize(
    ("state", "key"),
    [
        (SagaState.PENDING, "s-1:reserve:action"),
        (SagaState.COMPENSATING, "s-1:reserve:compensation"),
    ],
)
def test_the_current_execution_key_follows_the_saga_state(state: SagaState, key: str) -> None:
    record = SagaRecord(
        "s-1",
        "orders",
        "k",
        state,
        0,
        1,
        1,
        {},
        NOW,
        NOW,
        steps=(StepRecord(0, "reserve", StepStatus.RUNNING),),
    )
    assert current_execution_key(record) == key
