"""The saga state machine as tables: (view, event) -> decision. Pure: no broker, no store."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from celery_sagas.machine import (
    Begin,
    CompensationFailed,
    CompensationSucceeded,
    DeadLetterChange,
    Decision,
    ErrorKind,
    Event,
    RunCompensation,
    RunStep,
    SagaState,
    SagaView,
    SendToDeadLetterQueue,
    StepChange,
    StepFailed,
    StepStatus,
    StepSucceeded,
    StepView,
    Transition,
    decide,
    needs_compensation,
    next_to_compensate,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
NAMES = ("reserve", "charge", "ship", "notify")

S = SagaState
P = StepStatus.PENDING
R = StepStatus.RUNNING
C = StepStatus.COMPLETED
F = StepStatus.FAILED
T = StepStatus.TIMED_OUT
X = StepStatus.COMPENSATING
U = StepStatus.COMPENSATED  # undone
XF = StepStatus.COMPENSATION_FAILED
K = StepStatus.SKIPPED


def saga(
    state: SagaState | None,
    statuses: str,
    current: int = 0,
    token: int = 0,
    names: tuple[str, ...] = NAMES,
) -> SagaView:
    """A view from space-separated step statuses; ``failed:business`` sets the error kind."""
    steps = []
    for index, spec in enumerate(statuses.split()):
        status, _, kind = spec.partition(":")
        steps.append(
            StepView(index, names[index], StepStatus(status), ErrorKind(kind) if kind else None)
        )
    return SagaView("saga-1", "order", state, current, token, tuple(steps))


def statuses_of(view: SagaView) -> str:
    return " ".join(step.status.value for step in view.steps)


def changes(decision: Decision) -> list[tuple[int, StepStatus, StepStatus]]:
    return [(change.index, change.old, change.new) for change in decision.step_changes]


def apply(view: SagaView, decision: Decision) -> SagaView:
    """What the coordinator stores: the decision applied to the view."""
    assert decision.accepted, decision.note
    steps = list(view.steps)
    for change in decision.step_changes:
        before = steps[change.index]
        assert before.status == change.old, f"step {change.index} was {before.status}"
        kind = change.error_kind if change.error_kind is not None else before.error_kind
        steps[change.index] = replace(before, status=change.new, error_kind=kind)
    return replace(
        view,
        state=decision.state,
        current_step=decision.current_step,
        token=decision.token,
        steps=tuple(steps),
    )


# --- Begin ------------------------------------------------------------------------


def test_begin_starts_the_first_step() -> None:
    decision = decide(saga(None, "pending pending pending pending"), Begin(), NOW)

    assert decision.accepted
    assert decision.state == S.STARTED
    assert decision.current_step == 0
    assert decision.token == 1
    assert decision.reason is None
    assert decision.step_changes == (StepChange(0, P, R, dispatches=1),)
    assert decision.transitions == (
        Transition(None, "-", "STARTED"),
        Transition("reserve", "pending", "running"),
    )
    assert decision.commands == (RunStep(0, 1),)


@pytest.mark.parametrize(
    "state",
    [S.STARTED, S.PENDING, S.COMPENSATING, S.COMPLETED, S.FAILED, S.COMPENSATION_FAILED],
    ids=str,
)
def test_begin_is_ignored_once_the_saga_exists(state: SagaState) -> None:
    view = saga(state, "running pending pending pending", token=1)

    decision = decide(view, Begin(), NOW)

    assert decision == Decision(
        accepted=False, state=state, current_step=0, token=1, note=f"saga already {state}"
    )


# --- StepSucceeded ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("view", "event", "state", "current", "token", "step_changes", "commands"),
    [
        pytest.param(
            saga(S.STARTED, "running pending pending pending", current=0, token=1),
            StepSucceeded(0, 1),
            S.PENDING,
            1,
            2,
            [(0, R, C), (1, P, R)],
            (RunStep(1, 2),),
            id="first-step",
        ),
        pytest.param(
            saga(S.PENDING, "completed running pending pending", current=1, token=2),
            StepSucceeded(1, 2),
            S.PENDING,
            2,
            3,
            [(1, R, C), (2, P, R)],
            (RunStep(2, 3),),
            id="middle-step",
        ),
        pytest.param(
            saga(S.PENDING, "completed completed completed running", current=3, token=4),
            StepSucceeded(3, 4),
            S.COMPLETED,
            3,
            4,
            [(3, R, C)],
            (),
            id="last-step",
        ),
        pytest.param(
            saga(S.STARTED, "running", current=0, token=1),
            StepSucceeded(0, 1),
            S.COMPLETED,
            0,
            1,
            [(0, R, C)],
            (),
            id="only-step",
        ),
    ],
)
def test_step_succeeded(
    view: SagaView,
    event: StepSucceeded,
    state: SagaState,
    current: int,
    token: int,
    step_changes: list[tuple[int, StepStatus, StepStatus]],
    commands: tuple[RunStep, ...],
) -> None:
    decision = decide(view, event, NOW)

    assert decision.accepted
    assert decision.note == ""
    assert decision.state == state
    assert decision.current_step == current
    assert decision.token == token
    assert decision.reason is None
    assert changes(decision) == step_changes
    assert decision.commands == commands


def test_step_succeeded_records_the_result() -> None:
    view = saga(S.PENDING, "completed running pending pending", current=1, token=2)

    decision = decide(view, StepSucceeded(1, 2, result={"charge_id": "ch_1"}), NOW)

    assert decision.step_changes[0] == StepChange(
        1, R, C, result={"charge_id": "ch_1"}, has_result=True
    )
    assert decision.step_changes[1] == StepChange(2, P, R, dispatches=1)


@pytest.mark.parametrize(
    ("state", "saga_transitions"),
    [
        pytest.param(S.STARTED, [Transition(None, "STARTED", "PENDING")], id="started"),
        pytest.param(S.PENDING, [], id="already-pending"),
    ],
)
def test_step_succeeded_logs_saga_transition_only_on_change(
    state: SagaState, saga_transitions: list[Transition]
) -> None:
    view = saga(state, "completed running pending pending", current=1, token=2)

    decision = decide(view, StepSucceeded(1, 2), NOW)

    assert [t for t in decision.transitions if t.step is None] == saga_transitions
    assert [t for t in decision.transitions if t.step is not None] == [
        Transition("charge", "running", "completed"),
        Transition("ship", "pending", "running"),
    ]


def test_last_step_logs_completion() -> None:
    view = saga(S.PENDING, "completed completed completed running", current=3, token=4)

    decision = decide(view, StepSucceeded(3, 4), NOW)

    assert decision.transitions == (
        Transition("notify", "running", "completed"),
        Transition(None, "PENDING", "COMPLETED"),
    )


# --- replies that are not for the current attempt -------------------------------------

RUNNING_1 = saga(S.PENDING, "completed running pending pending", current=1, token=2)
COMPENSATING_1 = saga(S.COMPENSATING, "completed compensating failed skipped", current=1, token=4)


@pytest.mark.parametrize(
    ("view", "event", "note"),
    [
        pytest.param(RUNNING_1, StepSucceeded(1, 1), "token 1", id="succeeded-old-token"),
        pytest.param(RUNNING_1, StepSucceeded(1, 3), "token 3", id="succeeded-future-token"),
        pytest.param(RUNNING_1, StepFailed(1, 1, "x", True), "token 1", id="failed-old-token"),
        pytest.param(RUNNING_1, StepSucceeded(0, 2), "step 0", id="succeeded-wrong-step"),
        pytest.param(RUNNING_1, StepSucceeded(2, 2), "step 2", id="succeeded-later-step"),
        pytest.param(RUNNING_1, StepFailed(0, 2, "x", False), "step 0", id="failed-wrong-step"),
        pytest.param(
            saga(S.PENDING, "completed completed pending pending", current=1, token=2),
            StepSucceeded(1, 2),
            "step is completed",
            id="step-already-completed",
        ),
        pytest.param(
            saga(S.PENDING, "completed completed pending pending", current=1, token=2),
            StepFailed(1, 2, "x", False),
            "step is completed",
            id="failure-after-completion",
        ),
        pytest.param(
            saga(S.COMPLETED, "completed completed completed completed", current=3, token=4),
            StepSucceeded(3, 4),
            "saga is COMPLETED",
            id="saga-completed",
        ),
        pytest.param(
            saga(S.FAILED, "failed:business skipped skipped skipped", current=0, token=1),
            StepFailed(0, 1, "x", True),
            "saga is FAILED",
            id="saga-failed",
        ),
        pytest.param(
            COMPENSATING_1, StepSucceeded(1, 4), "saga is COMPENSATING", id="forward-reply-late"
        ),
        pytest.param(
            saga(S.COMPENSATION_FAILED, "compensation_failed failed skipped skipped", 0, 3),
            CompensationSucceeded(0, 2),
            "saga is COMPENSATION_FAILED",
            id="saga-compensation-failed-older-token",
        ),
        pytest.param(
            saga(None, "pending pending pending pending"),
            StepSucceeded(0, 0),
            "saga is None",
            id="saga-not-begun",
        ),
        pytest.param(
            RUNNING_1, CompensationSucceeded(1, 2), "saga is PENDING", id="compensation-reply-fwd"
        ),
        pytest.param(
            COMPENSATING_1, CompensationSucceeded(1, 3), "token 3", id="compensation-old-token"
        ),
        pytest.param(
            COMPENSATING_1, CompensationFailed(1, 3, "x"), "token 3", id="comp-failed-old-token"
        ),
        pytest.param(
            COMPENSATING_1, CompensationSucceeded(2, 4), "step 2", id="compensation-wrong-step"
        ),
        pytest.param(
            saga(S.COMPENSATING, "completed compensated failed skipped", current=1, token=4),
            CompensationSucceeded(1, 4),
            "step is compensated",
            id="compensation-already-done",
        ),
        pytest.param(
            saga(S.FAILED, "compensated compensated failed skipped", current=0, token=5),
            CompensationSucceeded(0, 5),
            "saga is FAILED",
            id="compensation-after-failed",
        ),
    ],
)
def test_stale_or_duplicate_reply_is_ignored(view: SagaView, event: Event, note: str) -> None:
    decision = decide(view, event, NOW)

    assert not decision.accepted
    assert note in decision.note
    assert "late" not in decision.note
    assert decision.state == view.state
    assert decision.current_step == view.current_step
    assert decision.token == view.token
    assert decision.reason is None
    assert decision.step_changes == ()
    assert decision.transitions == ()
    assert decision.commands == ()


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(StepSucceeded(1, 2), id="succeeded"),
        pytest.param(StepFailed(1, 2, "x", business=False), id="failed"),
    ],
)
def test_reply_to_timed_out_step_is_late(event: Event) -> None:
    view = saga(S.PENDING, "completed timed_out pending pending", current=1, token=2)

    decision = decide(view, event, NOW)

    assert not decision.accepted
    assert "late" in decision.note
    assert "timed out" in decision.note
    assert decision.step_changes == decision.transitions == decision.commands == ()
    assert (decision.state, decision.current_step, decision.token) == (S.PENDING, 1, 2)


# --- StepFailed ---------------------------------------------------------------------


def running_at(index: int, steps: int = 4) -> SagaView:
    """Steps before ``index`` completed, ``index`` running: token is index + 1."""
    statuses = ["completed"] * index + ["running"] + ["pending"] * (steps - index - 1)
    state = S.STARTED if index == 0 else S.PENDING
    return saga(state, " ".join(statuses), current=index, token=index + 1)


@pytest.mark.parametrize(
    ("index", "state", "current", "token", "step_changes", "commands"),
    [
        pytest.param(
            0, S.FAILED, 0, 1, [(0, R, F), (1, P, K), (2, P, K), (3, P, K)], (), id="step-0"
        ),
        pytest.param(
            1,
            S.COMPENSATING,
            0,
            3,
            [(1, R, F), (2, P, K), (3, P, K), (0, C, X)],
            (RunCompensation(0, 3),),
            id="step-1",
        ),
        pytest.param(
            2,
            S.COMPENSATING,
            1,
            4,
            [(2, R, F), (3, P, K), (1, C, X)],
            (RunCompensation(1, 4),),
            id="step-2",
        ),
        pytest.param(
            3, S.COMPENSATING, 2, 5, [(3, R, F), (2, C, X)], (RunCompensation(2, 5),), id="step-3"
        ),
    ],
)
def test_business_failure_compensates_the_previous_step_only(
    index: int,
    state: SagaState,
    current: int,
    token: int,
    step_changes: list[tuple[int, StepStatus, StepStatus]],
    commands: tuple[RunCompensation, ...],
) -> None:
    decision = decide(running_at(index), StepFailed(index, index + 1, "declined", True), NOW)

    assert decision.accepted
    assert decision.state == state
    assert decision.current_step == current
    assert decision.token == token
    assert decision.reason == f"{NAMES[index]} failed: declined"
    assert changes(decision) == step_changes
    assert decision.commands == commands
    failed = decision.step_changes[0]
    assert (failed.error, failed.error_kind) == ("declined", ErrorKind.BUSINESS)
    assert all(c.index != index for c in decision.step_changes[1:]), "failed step compensated"


@pytest.mark.parametrize(
    ("index", "step_changes"),
    [
        pytest.param(0, [(0, R, F), (1, P, K), (2, P, K), (3, P, K), (0, F, X)], id="step-0"),
        pytest.param(1, [(1, R, F), (2, P, K), (3, P, K), (1, F, X)], id="step-1"),
        pytest.param(2, [(2, R, F), (3, P, K), (2, F, X)], id="step-2"),
        pytest.param(3, [(3, R, F), (3, F, X)], id="step-3"),
    ],
)
def test_unexpected_failure_compensates_the_failed_step_first(
    index: int, step_changes: list[tuple[int, StepStatus, StepStatus]]
) -> None:
    decision = decide(running_at(index), StepFailed(index, index + 1, "boom", False), NOW)

    assert decision.accepted
    assert decision.state == S.COMPENSATING
    assert decision.current_step == index
    assert decision.token == index + 2
    assert decision.reason == f"{NAMES[index]} failed: boom"
    assert changes(decision) == step_changes
    assert decision.commands == (RunCompensation(index, index + 2),)
    assert decision.step_changes[0].error_kind == ErrorKind.ERROR


def test_business_failure_at_first_step_logs_the_reason() -> None:
    decision = decide(running_at(0), StepFailed(0, 1, "out of stock", True), NOW)

    assert decision.transitions == (
        Transition("reserve", "running", "failed", "out of stock"),
        Transition("charge", "pending", "skipped"),
        Transition("ship", "pending", "skipped"),
        Transition("notify", "pending", "skipped"),
        Transition(None, "STARTED", "FAILED", "reserve failed: out of stock"),
    )


def test_failure_logs_saga_and_step_transitions() -> None:
    decision = decide(running_at(2), StepFailed(2, 3, "no courier", True), NOW)

    assert decision.transitions == (
        Transition("ship", "running", "failed", "no courier"),
        Transition("notify", "pending", "skipped"),
        Transition(None, "PENDING", "COMPENSATING", "ship failed: no courier"),
        Transition("charge", "completed", "compensating"),
    )


# --- compensation replies --------------------------------------------------------------


@pytest.mark.parametrize(
    ("view", "event", "state", "current", "token", "step_changes", "commands"),
    [
        pytest.param(
            saga(S.COMPENSATING, "completed completed compensating failed", current=2, token=5),
            CompensationSucceeded(2, 5),
            S.COMPENSATING,
            1,
            6,
            [(2, X, U), (1, C, X)],
            (RunCompensation(1, 6),),
            id="walks-down",
        ),
        pytest.param(
            saga(S.COMPENSATING, "completed compensating compensated failed", current=1, token=6),
            CompensationSucceeded(1, 6),
            S.COMPENSATING,
            0,
            7,
            [(1, X, U), (0, C, X)],
            (RunCompensation(0, 7),),
            id="walks-to-step-0",
        ),
        pytest.param(
            saga(S.COMPENSATING, "compensating compensated compensated failed", 0, 7),
            CompensationSucceeded(0, 7),
            S.FAILED,
            0,
            7,
            [(0, X, U)],
            (),
            id="ends-after-step-0",
        ),
        pytest.param(
            saga(S.COMPENSATING, "compensating skipped skipped skipped", current=0, token=2),
            CompensationSucceeded(0, 2),
            S.FAILED,
            0,
            2,
            [(0, X, U)],
            (),
            id="failed-step-0-undone",
        ),
        pytest.param(
            saga(S.COMPENSATING, "completed timed_out compensating failed", current=2, token=5),
            CompensationSucceeded(2, 5),
            S.COMPENSATING,
            1,
            6,
            [(2, X, U), (1, T, X)],
            (RunCompensation(1, 6),),
            id="timed-out-step-compensated",
        ),
    ],
)
def test_compensation_succeeded(
    view: SagaView,
    event: CompensationSucceeded,
    state: SagaState,
    current: int,
    token: int,
    step_changes: list[tuple[int, StepStatus, StepStatus]],
    commands: tuple[RunCompensation, ...],
) -> None:
    decision = decide(view, event, NOW)

    assert decision.accepted
    assert decision.state == state
    assert decision.current_step == current
    assert decision.token == token
    assert changes(decision) == step_changes
    assert decision.commands == commands


def test_last_compensation_logs_failed() -> None:
    view = saga(S.COMPENSATING, "compensating compensated failed skipped", current=0, token=5)

    decision = decide(view, CompensationSucceeded(0, 5), NOW)

    assert decision.transitions == (
        Transition("reserve", "compensating", "compensated"),
        Transition(None, "COMPENSATING", "FAILED"),
    )


def test_compensation_failed_stops_the_saga() -> None:
    view = saga(S.COMPENSATING, "completed compensating compensated failed", current=1, token=6)

    decision = decide(view, CompensationFailed(1, 6, "refund API down"), NOW)

    assert decision.accepted
    assert decision.state == S.COMPENSATION_FAILED
    assert decision.current_step == 1
    assert decision.token == 6
    assert decision.commands == (SendToDeadLetterQueue(1),)
    assert decision.dead_letter == DeadLetterChange(1, "dead", "refund API down")
    assert decision.step_changes == (StepChange(1, X, XF, error="refund API down"),)
    assert decision.transitions == (
        Transition("charge", "compensating", "compensation_failed", "refund API down"),
        Transition(
            None,
            "COMPENSATING",
            "COMPENSATION_FAILED",
            "compensation of charge failed: refund API down",
        ),
    )


# --- helpers used by the machine --------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("pending", False),
        ("running", False),
        ("completed", True),
        ("timed_out", True),
        ("failed:error", True),
        ("failed:timeout", True),
        ("failed:business", False),
        ("compensating", False),
        ("compensated", False),
        ("compensation_failed", False),
        ("skipped", False),
    ],
    ids=str,
)
def test_needs_compensation(spec: str, expected: bool) -> None:
    (step,) = saga(S.COMPENSATING, spec).steps
    assert needs_compensation(step) is expected


@pytest.mark.parametrize(
    ("statuses", "below", "expected"),
    [
        pytest.param("completed completed completed failed", 3, 2, id="highest-below"),
        pytest.param("completed completed completed failed:error", 4, 3, id="includes-failed"),
        pytest.param("completed completed failed:business skipped", 3, 1, id="skips-business"),
        pytest.param("completed skipped compensated running", 4, 0, id="skips-done"),
        pytest.param("completed completed completed completed", 0, None, id="nothing-below-0"),
        pytest.param("skipped compensated failed:business pending", 4, None, id="none-left"),
    ],
)
def test_next_to_compensate(statuses: str, below: int, expected: int | None) -> None:
    assert next_to_compensate(saga(S.COMPENSATING, statuses).steps, below) == expected


def test_unknown_event_is_refused() -> None:
    with pytest.raises(TypeError, match="unknown event"):
        decide(saga(None, "pending"), object(), NOW)  # type: ignore[arg-type]


# --- whole sagas, run purely -------------------------------------------------------------


def run_saga(
    *,
    steps: int = 4,
    fail_at: int | None = None,
    business: bool = True,
    compensation_fails_at: int | None = None,
    redeliver: bool = False,
) -> tuple[SagaView, list[RunStep | RunCompensation]]:
    """Begin a saga and answer every command until none is left.

    Each decision must carry at most one command; with ``redeliver`` every reply is
    delivered twice and the duplicate must be ignored.
    """
    view = saga(None, " ".join(["pending"] * steps))
    decision = decide(view, Begin(), NOW)
    sent: list[RunStep | RunCompensation] = []
    while True:
        view = apply(view, decision)
        assert len(decision.commands) <= 1
        if not decision.commands or isinstance(decision.commands[0], SendToDeadLetterQueue):
            return view, sent
        (command,) = decision.commands
        sent.append(command)
        event: Event
        if isinstance(command, RunStep):
            if command.step == fail_at:
                event = StepFailed(command.step, command.token, "boom", business)
            else:
                event = StepSucceeded(command.step, command.token, result=command.step)
        elif command.step == compensation_fails_at:
            event = CompensationFailed(command.step, command.token, "refund failed")
        else:
            event = CompensationSucceeded(command.step, command.token)
        decision = decide(view, event, NOW)
        if redeliver:
            duplicate = decide(apply(view, decision), event, NOW)
            assert not duplicate.accepted
            assert duplicate.commands == ()


def forward(count: int) -> list[RunStep]:
    return [RunStep(index, index + 1) for index in range(count)]


def backward(indexes: range, first_token: int) -> list[RunCompensation]:
    return [RunCompensation(index, first_token + n) for n, index in enumerate(indexes)]


@pytest.mark.parametrize("redeliver", [False, True], ids=["once", "redelivered"])
def test_run_happy_path(redeliver: bool) -> None:
    view, sent = run_saga(redeliver=redeliver)

    assert sent == forward(4)
    assert view.state == S.COMPLETED
    assert statuses_of(view) == "completed completed completed completed"
    assert view.token == 4


@pytest.mark.parametrize(
    ("fail_at", "commands", "final"),
    [
        pytest.param(0, forward(1), "failed skipped skipped skipped", id="step-0"),
        pytest.param(
            1,
            forward(2) + backward(range(0, -1, -1), 3),
            "compensated failed skipped skipped",
            id="step-1",
        ),
        pytest.param(
            2,
            forward(3) + backward(range(1, -1, -1), 4),
            "compensated compensated failed skipped",
            id="step-2",
        ),
        pytest.param(
            3,
            forward(4) + backward(range(2, -1, -1), 5),
            "compensated compensated compensated failed",
            id="step-3",
        ),
    ],
)
@pytest.mark.parametrize("redeliver", [False, True], ids=["once", "redelivered"])
def test_run_business_failure(
    fail_at: int, commands: list[RunStep | RunCompensation], final: str, redeliver: bool
) -> None:
    view, sent = run_saga(fail_at=fail_at, business=True, redeliver=redeliver)

    assert sent == commands
    assert view.state == S.FAILED
    assert statuses_of(view) == final
    assert view.steps[fail_at].error_kind == ErrorKind.BUSINESS
    assert [c.token for c in sent] == list(range(1, len(sent) + 1))


@pytest.mark.parametrize(
    ("fail_at", "commands", "final"),
    [
        pytest.param(
            0,
            forward(1) + backward(range(0, -1, -1), 2),
            "compensated skipped skipped skipped",
            id="step-0",
        ),
        pytest.param(
            1,
            forward(2) + backward(range(1, -1, -1), 3),
            "compensated compensated skipped skipped",
            id="step-1",
        ),
        pytest.param(
            2,
            forward(3) + backward(range(2, -1, -1), 4),
            "compensated compensated compensated skipped",
            id="step-2",
        ),
        pytest.param(
            3,
            forward(4) + backward(range(3, -1, -1), 5),
            "compensated compensated compensated compensated",
            id="step-3",
        ),
    ],
)
def test_run_unexpected_failure(
    fail_at: int, commands: list[RunStep | RunCompensation], final: str
) -> None:
    view, sent = run_saga(fail_at=fail_at, business=False)

    assert sent == commands
    assert view.state == S.FAILED
    assert statuses_of(view) == final
    assert view.steps[fail_at].error_kind == ErrorKind.ERROR
    assert [c.token for c in sent] == list(range(1, len(sent) + 1))


@pytest.mark.parametrize(
    ("compensation_fails_at", "commands", "final"),
    [
        pytest.param(
            2,
            forward(4) + backward(range(2, 1, -1), 5),
            "completed completed compensation_failed failed",
            id="first-compensation",
        ),
        pytest.param(
            1,
            forward(4) + backward(range(2, 0, -1), 5),
            "completed compensation_failed compensated failed",
            id="middle-compensation",
        ),
        pytest.param(
            0,
            forward(4) + backward(range(2, -1, -1), 5),
            "compensation_failed compensated compensated failed",
            id="last-compensation",
        ),
    ],
)
def test_run_compensation_failure_stops_the_walk(
    compensation_fails_at: int, commands: list[RunStep | RunCompensation], final: str
) -> None:
    view, sent = run_saga(fail_at=3, business=True, compensation_fails_at=compensation_fails_at)

    assert sent == commands
    assert view.state == S.COMPENSATION_FAILED
    assert statuses_of(view) == final


def test_a_dead_lettered_compensations_late_success_is_applied() -> None:
    """A run of the dead-lettered compensation that began before (a redelivery) finished
    well: the step is compensated, the dead letter resolved and the saga goes on."""
    view = saga(S.COMPENSATION_FAILED, "completed compensation_failed failed skipped", 1, 3)
    decision = decide(view, CompensationSucceeded(1, 3), NOW)
    assert decision.accepted
    assert decision.step_changes[0].index == 1
    assert decision.step_changes[0].new == StepStatus.COMPENSATED
    assert decision.dead_letter is not None and decision.dead_letter.status == "resolved"
    assert decision.state == S.COMPENSATING
    assert decision.commands == (RunCompensation(0, 4),)
