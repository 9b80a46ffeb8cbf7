"""``row_changes``: what writing a decision does to a saga's rows, the one rule the SQL store
and the in-memory fake both apply. Tables of inputs and the exact values they must give."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from celery_sagas import row_changes
from celery_sagas.errors import ConcurrentUpdateError, PayloadConflictError, SagaError
from celery_sagas.machine import (
    DeadLetterChange,
    Decision,
    ErrorKind,
    SagaState,
    StepChange,
    StepStatus,
    Transition,
)
from celery_sagas.records import (
    DeadLetterRecord,
    GuardOutcome,
    GuardRecord,
    NewSaga,
    OutboxMessage,
    SagaRecord,
    StepRecord,
    TransitionRecord,
    step_values,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
LATER = NOW + timedelta(seconds=30)
S = StepStatus


def _saga(version: int = 3, **fields: Any) -> SagaRecord:
    return SagaRecord(
        saga_id="s-1",
        name="order",
        business_key="k-1",
        state=SagaState.PENDING,
        current_step=0,
        token=1,
        version=version,
        payload={"id": 1},
        created_at=NOW - timedelta(hours=1),
        updated_at=NOW - timedelta(hours=1),
        steps=(StepRecord(0, "reserve", S.RUNNING), StepRecord(1, "charge", S.PENDING)),
        **fields,
    )


def _decision(**fields: Any) -> Decision:
    values: dict[str, Any] = {
        "accepted": True,
        "state": SagaState.PENDING,
        "current_step": 1,
        "token": 2,
    }
    return Decision(**{**values, **fields})


NEW = NewSaga(
    saga_id="s-1",
    name="order",
    business_key="k-1",
    payload={"id": 1},
    payload_hash="h",
    step_names=("reserve", "charge", "ship"),
    deadline_at=LATER,
    definition="fp",
)


# -- the saga row --------------------------------------------------------------------------

ALWAYS = {"state", "current_step", "token", "version", "updated_at", "due_at"}


@pytest.mark.parametrize(
    ("decision", "extra"),
    [
        (_decision(), {}),
        (_decision(reason="boom"), {"reason": "boom"}),
        (_decision(state=SagaState.COMPLETED), {"finished_at": NOW}),
        (_decision(state=SagaState.FAILED, reason="x"), {"finished_at": NOW, "reason": "x"}),
        # COMPENSATION_FAILED is settled but not finished: it can still be retried
        (_decision(state=SagaState.COMPENSATION_FAILED), {}),
        (_decision(state=SagaState.COMPENSATING), {}),
        (_decision(admitted=True), {"admitted": True}),
    ],
)
def test_saga_columns_set_only_what_the_decision_changes(
    decision: Decision, extra: dict[str, Any]
) -> None:
    columns = row_changes.saga_columns(_saga(version=3), replace(decision, due_at=LATER), NOW)
    assert set(columns) == ALWAYS | set(extra)
    assert columns["state"] == decision.state.value if decision.state else None
    assert (columns["current_step"], columns["token"]) == (1, 2)
    assert (columns["version"], columns["updated_at"], columns["due_at"]) == (4, NOW, LATER)
    assert {k: columns[k] for k in extra} == extra


def test_new_saga_columns_start_at_version_one() -> None:
    decision = _decision(state=SagaState.STARTED, current_step=0, token=1, admitted=True)
    columns = row_changes.new_saga_columns(NEW, decision, NOW)
    assert columns == {
        "id": "s-1",
        "name": "order",
        "business_key": "k-1",
        "payload": {"id": 1},
        "payload_hash": "h",
        "state": "STARTED",
        "current_step": 0,
        "token": 1,
        "version": 1,
        "created_at": NOW,
        "updated_at": NOW,
        "deadline_at": LATER,
        "due_at": None,
        "admitted": True,
        "definition": "fp",
    }


@pytest.mark.parametrize(
    ("current_version", "read_version", "still"),
    [(3, 3, True), (4, 3, False), (2, 3, False), (None, 3, False)],
)
def test_the_version_compare_and_set(
    current_version: int | None, read_version: int, still: bool
) -> None:
    current = None if current_version is None else _saga(version=current_version)
    assert row_changes.still_at(current, _saga(version=read_version)) is still


def test_a_lost_compare_and_set_names_the_saga_and_the_version_read() -> None:
    error = row_changes.changed_since(_saga(version=7))
    assert isinstance(error, ConcurrentUpdateError)
    assert error.message == "saga s-1 changed since version 7"
    assert error.details == {"saga_id": "s-1"}


def test_saga_fields_name_the_record_fields() -> None:
    fields = row_changes.saga_fields({"id": "s", "payload_hash": "h", "state": "FAILED", "x": 1})
    assert fields == {"saga_id": "s", "state": SagaState.FAILED, "x": 1}
    assert type(fields["state"]) is SagaState


# -- the step rows ---------------------------------------------------------------------------


def _apply_one_by_one(step: StepRecord, changes: list[StepChange]) -> StepRecord:
    for change in changes:
        step = replace(step, **row_changes.step_fields(step_values(change, NOW)))
    return step


FAILED_THEN_COMPENSATING = [
    StepChange(0, S.RUNNING, S.FAILED, error="boom", error_kind=ErrorKind.ERROR, attempts=3),
    StepChange(0, S.FAILED, S.COMPENSATING, deadline_at=LATER, dispatches=1),
]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            [StepChange(0, S.PENDING, S.RUNNING, deadline_at=LATER, dispatches=1)],
            # running keeps its deadline; started now, not finished
            {0: {"status": S.RUNNING, "deadline_at": LATER, "dispatches": 1,
                 "started_at": NOW, "finished_at": None}},
        ),
        (
            FAILED_THEN_COMPENSATING,
            {0: {"status": S.COMPENSATING, "error": "boom", "error_kind": ErrorKind.ERROR,
                 "attempts": 3, "finished_at": NOW, "deadline_at": LATER, "dispatches": 1,
                 "redispatch_at": None, "compensation_started_at": NOW}},
        ),
        (
            [StepChange(0, S.RUNNING, S.COMPLETED, result={"a": 1}, has_result=True),
             StepChange(1, S.PENDING, S.RUNNING)],
            {0: {"status": S.COMPLETED, "result": {"a": 1}, "finished_at": NOW,
                 "deadline_at": None, "redispatch_at": None},
             1: {"status": S.RUNNING, "started_at": NOW, "finished_at": None}},
        ),
        ([], {}),
    ],
)  # fmt: skip
def test_step_columns_merge_a_steps_changes_in_order(
    changes: list[StepChange], expected: dict[int, dict[str, Any]]
) -> None:
    assert row_changes.step_columns(changes, NOW) == expected


def test_merged_step_columns_leave_the_row_as_the_changes_one_by_one() -> None:
    step = StepRecord(0, "reserve", S.RUNNING, started_at=NOW - timedelta(minutes=1))
    merged = row_changes.step_columns(FAILED_THEN_COMPENSATING, NOW)[0]
    assert replace(step, **row_changes.step_fields(merged)) == _apply_one_by_one(
        step, FAILED_THEN_COMPENSATING
    )


def test_a_new_sagas_step_rows_are_pending_then_the_decisions_changes() -> None:
    decision = _decision(step_changes=(StepChange(0, S.PENDING, S.RUNNING, deadline_at=LATER),))
    rows = row_changes.new_step_columns(NEW, decision, NOW)
    assert [i for i, _ in rows] == [0, 1, 2]
    assert rows[1][1] == {"idx": 1, "name": "charge", "status": "pending"}
    assert rows[0][1]["status"] == S.RUNNING and rows[0][1]["started_at"] == NOW
    assert rows[0][1]["deadline_at"] == LATER


def test_the_new_saga_record_is_what_its_columns_say() -> None:
    decision = _decision(
        state=SagaState.STARTED,
        current_step=0,
        token=1,
        admitted=True,
        step_changes=(StepChange(0, S.PENDING, S.RUNNING, deadline_at=LATER, dispatches=1),),
    )
    record = row_changes.new_saga_record(NEW, decision, NOW)
    assert (record.saga_id, record.state, record.version, record.admitted) == (
        "s-1",
        SagaState.STARTED,
        1,
        True,
    )
    assert (record.created_at, record.deadline_at, record.definition) == (NOW, LATER, "fp")
    assert record.steps == (
        StepRecord(0, "reserve", S.RUNNING, started_at=NOW, deadline_at=LATER, dispatches=1),
        StepRecord(1, "charge", S.PENDING),
        StepRecord(2, "ship", S.PENDING),
    )


# -- the transition log and the outbox ----------------------------------------------------------


@pytest.mark.parametrize(("actor", "logged"), [(None, "coordinator"), ("alice", "alice")])
def test_transition_rows_in_order_with_the_actor(actor: str | None, logged: str) -> None:
    decision = _decision(
        actor=actor,
        transitions=(
            Transition(None, "PENDING", "COMPENSATING", "boom"),
            Transition("a", "x", "y"),
        ),
    )
    assert row_changes.transition_rows("s-1", decision, NOW) == [
        TransitionRecord("s-1", NOW, None, "PENDING", "COMPENSATING", "boom", logged),
        TransitionRecord("s-1", NOW, "a", "x", "y", None, logged),
    ]


@pytest.mark.parametrize(
    ("body", "key"),
    [({"key": "s-1:reserve:action", "step": 0}, "s-1:reserve:action"), ({"dlq": 1}, None)],
)
def test_an_outbox_rows_key_is_its_bodys(body: dict[str, Any], key: str | None) -> None:
    message = OutboxMessage("s-1", body)
    row = row_changes.outbox_columns("s-1", message, NOW)
    assert row == {"saga_id": "s-1", "body": body, "created_at": NOW, "key": key}
    assert row["body"] is not message.body  # a copy: the caller's mapping is not stored


@pytest.mark.parametrize(("fresh", "consumes"), [(True, False), (False, True)])
def test_only_a_saga_that_moved_on_consumes_its_unsent_messages(
    fresh: bool, consumes: bool
) -> None:
    assert row_changes.consumes_unsent(fresh) is consumes


def test_written_messages_carry_their_new_ids() -> None:
    messages = [OutboxMessage("s-1", {"n": 1}), OutboxMessage("s-1", {"n": 2})]
    assert row_changes.written_messages("s-1", messages, [7, 9], NOW) == (
        OutboxMessage("s-1", {"n": 1}, id=7, created_at=NOW),
        OutboxMessage("s-1", {"n": 2}, id=9, created_at=NOW),
    )
    with pytest.raises(ValueError):
        row_changes.written_messages("s-1", messages, [7], NOW)


# -- step guards --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "replaceable"),
    [
        (None, True),
        (GuardOutcome.STARTED, True),
        (GuardOutcome.OK, False),
        (GuardOutcome.BUSINESS, False),
        (GuardOutcome.ERROR, False),
    ],
)
def test_only_nothing_or_a_started_marker_is_replaced(
    outcome: GuardOutcome | None, replaceable: bool
) -> None:
    recorded = None if outcome is None else GuardRecord("k", outcome, recorded_at=NOW)
    assert row_changes.replaceable(recorded) is replaceable


def test_guard_rows_are_stamped_now() -> None:
    assert row_changes.started_marker("k", NOW) == GuardRecord(
        "k", GuardOutcome.STARTED, recorded_at=NOW
    )
    outcome = GuardRecord("k", GuardOutcome.OK, {"r": 1}, None, recorded_at=LATER)
    assert row_changes.recorded_guard(outcome, NOW) == replace(outcome, recorded_at=NOW)
    assert row_changes.guard_columns(outcome, NOW) == {
        "key": "k",
        "outcome": GuardOutcome.OK,
        "result": {"r": 1},
        "error": None,
        "recorded_at": NOW,
    }


# -- the dead-letter entry ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            DeadLetterChange(1, "dead", error="e", traceback="tb", attempts=5),
            {"attempts": 5, "error": "e", "traceback": "tb", "next_auto_retry_at": None},
        ),
        (
            DeadLetterChange(1, "dead", next_auto_retry_at=LATER),
            {"attempts": 0, "error": None, "traceback": None, "next_auto_retry_at": LATER},
        ),
    ],
)
def test_a_death_sets_the_failure_and_reopens_the_entry(
    change: DeadLetterChange, expected: dict[str, Any]
) -> None:
    reopened = {"status": "dead", "updated_at": NOW, "resolved_at": None}
    assert row_changes.buried_columns(change, NOW) == {**expected, **reopened}


@pytest.mark.parametrize(
    ("task_name", "payload", "task", "stored"),
    [
        (None, None, "order.charge", {}),
        ("tasks.charge", {"amount": 3}, "tasks.charge", {"amount": 3}),
    ],
)
def test_a_first_entry_names_its_task_and_payload(
    task_name: str | None, payload: Any, task: str, stored: Any
) -> None:
    change = DeadLetterChange(1, "dead", attempts=2, task_name=task_name, payload=payload)
    columns = row_changes.new_entry_columns("s-1", "order", "charge", change, NOW)
    assert columns == {
        "saga_id": "s-1",
        "saga_name": "order",
        "step": 1,
        "step_name": "charge",
        "task_name": task,
        "payload": stored,
        "created_at": NOW,
        "deaths": 1,
        **row_changes.buried_columns(change, NOW),
    }


@pytest.mark.parametrize(
    ("status", "forgets"),
    [("retrying", True), ("dead", False), ("resolved", False), ("discarded", False)],
)
def test_only_a_retry_forgets_the_compensations_started_marker(status: str, forgets: bool) -> None:
    assert row_changes.forgets_started_marker(status) is forgets


# -- what a scan sees ---------------------------------------------------------------------------


@pytest.mark.parametrize(("began_at", "started"), [(NOW, True), (None, False)])
def test_a_claim_flags_only_the_current_step(began_at: datetime | None, started: bool) -> None:
    saga = replace(_saga(), current_step=1)
    claimed = row_changes.with_current_start(saga, began_at)
    assert claimed.steps[0] == saga.steps[0]
    assert (claimed.steps[1].started, claimed.steps[1].began_at) == (started, began_at)
    assert replace(claimed, steps=saga.steps) == saga


# -- retention ----------------------------------------------------------------------------------


def test_a_sagas_guards_are_its_steps_and_renamed_steps_and_hooks() -> None:
    pairs = [("a", "reserve"), ("a", "old_name"), ("b", "ship")]
    assert row_changes.owned_guard_keys(["a", "b", "c"], pairs) == {
        "a:reserve:action",
        "a:reserve:compensation",
        "a:old_name:action",
        "a:old_name:compensation",
        "a:on_completed:hook",
        "a:on_failed:hook",
        "b:ship:action",
        "b:ship:compensation",
        "b:on_completed:hook",
        "b:on_failed:hook",
        "c:on_completed:hook",  # no steps: its hooks' claims still
        "c:on_failed:hook",
    }
    assert row_changes.owned_guard_keys([], []) == set()


OLD, CUT = NOW - timedelta(hours=2), NOW - timedelta(hours=1)


@pytest.mark.parametrize(
    ("rows", "limit", "deleted"),
    [
        ([], 2, []),
        # the oldest row is younger than the cutoff: nothing older, done
        ([(1, CUT, CUT - timedelta(seconds=1))], 2, []),
        ([(1, OLD, OLD), (2, OLD, None), (3, OLD, NOW), (4, OLD, OLD)], 5, [1, 4]),
        # up to ``limit`` of them
        ([(1, OLD, OLD), (2, OLD, OLD), (3, OLD, OLD)], 2, [1, 2]),
        # only among the oldest limit * OUTBOX_WINDOW_FACTOR rows
        ([(i, OLD, None) for i in range(1, 5)] + [(5, OLD, OLD)], 1, []),
        ([(i, OLD, None) for i in range(1, 4)] + [(4, OLD, OLD)], 1, [4]),
    ],
)
def test_the_sent_outbox_rows_a_pass_deletes(
    rows: list[tuple[int, datetime, datetime | None]], limit: int, deleted: list[int]
) -> None:
    assert row_changes.OUTBOX_WINDOW_FACTOR == 4
    assert row_changes.sent_rows_deleted(iter(rows), CUT, limit) == deleted


# -- a start whose saga exists ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("existing_id", "existing_hash", "refused", "details"),
    [
        ("s-0", "h", None, None),  # the same start again: the existing saga answers it
        ("s-0", "other", PayloadConflictError, {"saga_id": "s-0", "business_key": "k-1"}),
        (None, None, SagaError, {"saga_id": "s-1"}),  # the id alone is taken
    ],
)
def test_a_start_of_an_existing_saga(
    existing_id: str | None,
    existing_hash: str | None,
    refused: type[SagaError] | None,
    details: dict[str, str] | None,
) -> None:
    error = row_changes.refused_start(NEW, existing_id, existing_hash)
    if refused is None:
        assert error is None
        return
    assert type(error) is refused and error.details == details
    assert error.message.endswith("nothing was written")


def _entry(status: str = "dead", auto_retries: int = 1) -> DeadLetterRecord:
    return DeadLetterRecord(
        id=1,
        saga_id="s-1",
        saga_name="order",
        step=1,
        step_name="charge",
        task_name="order.charge",
        status=status,
        attempts=3,
        deaths=1,
        error="e",
        traceback=None,
        payload={},
        created_at=NOW,
        updated_at=NOW,
        auto_retries=auto_retries,
    )


@pytest.mark.parametrize(
    ("current", "claimable"),
    [
        (_entry(), True),
        (_entry(auto_retries=2), False),  # another worker retried it since
        (_entry(status="retrying"), False),
        (_entry(status="resolved"), False),
        (None, False),  # pruned since
    ],
)
def test_an_automatic_retry_is_claimed_once(
    current: DeadLetterRecord | None, claimable: bool
) -> None:
    assert row_changes.auto_retry_claimable(current, _entry()) is claimable
    assert row_changes.auto_retry_columns(_entry(), LATER) == {
        "auto_retries": 2,
        "next_auto_retry_at": LATER,
    }
