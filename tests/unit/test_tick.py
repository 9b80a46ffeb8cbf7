"""The scanner's decisions (``Tick``) with an injected clock: no sleeping to wait for time."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from celery_sagas.machine import (
    Admit,
    Begin,
    CompensationSucceeded,
    ErrorKind,
    RunCompensation,
    RunStep,
    SagaState,
    SagaView,
    StepStatus,
    StepSucceeded,
    StepView,
    Tick,
    decide,
)
from celery_sagas.scanner import classify

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NAMES = ("reserve", "pay", "ship", "confirm")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new_saga(
    timeouts: tuple[float | None, ...] = (3, 3, 3, 3),
    deadline: float | None = None,
    max_redispatches: int = 2,
) -> SagaView:
    return SagaView(
        saga_id="S",
        name="orders",
        state=None,
        current_step=0,
        token=0,
        steps=tuple(
            StepView(i, n, StepStatus.PENDING, timeout=timeouts[i]) for i, n in enumerate(NAMES)
        ),
        deadline_at=at(deadline) if deadline else None,
        max_redispatches=max_redispatches,
    )


def apply(view: SagaView, event: object, now: datetime) -> tuple[SagaView, object]:
    """Apply a decision to the view, as the store would."""
    decision = decide(view, event, now)  # type: ignore[arg-type]
    assert decision.accepted, decision.note
    steps = list(view.steps)
    for change in decision.step_changes:
        old = steps[change.index]
        steps[change.index] = StepView(
            old.index,
            old.name,
            change.new,
            change.error_kind or old.error_kind,
            old.timeout,
            change.deadline_at
            if change.deadline_at
            else (
                old.deadline_at
                if change.new in (StepStatus.RUNNING, StepStatus.COMPENSATING)
                else None
            ),
            change.redispatch_at
            if change.new in (StepStatus.RUNNING, StepStatus.COMPENSATING)
            else None,
            change.dispatches if change.dispatches is not None else old.dispatches,
        )
    new_view = SagaView(
        view.saga_id,
        view.name,
        decision.state,
        decision.current_step,
        decision.token,
        tuple(steps),
        view.deadline_at,
        view.max_redispatches,
    )
    return new_view, decision


def test_begin_sets_the_first_deadline_and_the_due_time() -> None:
    decision = decide(new_saga(), Begin(), at(0))
    running = decision.step_changes[0]
    assert running.deadline_at == at(3)
    assert running.redispatch_at == at(1)  # timeout / (max_redispatches + 1)
    assert decision.due_at == at(1)


@pytest.mark.parametrize("now", [0, 0.5, 0.999])
def test_nothing_is_due_before_the_resend_time(now: float) -> None:
    view, _ = apply(new_saga(), Begin(), at(0))
    assert not decide(view, Tick(), at(now)).accepted


def test_a_silent_step_is_resent_with_the_same_token_then_times_out() -> None:
    view, _ = apply(new_saga(), Begin(), at(0))
    view, first = apply(view, Tick(), at(1))
    assert first.commands == (RunStep(0, 1),)
    assert first.step_changes[0].dispatches == 2
    assert first.due_at == at(2)
    view, second = apply(view, Tick(), at(2))
    assert second.commands == (RunStep(0, 1),)
    assert second.due_at == at(3)  # no more re-sends: only the deadline is left
    assert not decide(view, Tick(), at(2.5)).accepted
    view, timed_out = apply(view, Tick(), at(3))
    assert timed_out.state == SagaState.COMPENSATING
    assert timed_out.step_changes[0].new == StepStatus.TIMED_OUT
    assert timed_out.step_changes[0].error_kind == ErrorKind.TIMEOUT
    # the timed-out step may have acted: it is compensated itself
    assert timed_out.commands == (RunCompensation(0, 2),)
    assert classify(timed_out).timed_out == 1


def test_a_timed_out_middle_step_compensates_itself_then_the_earlier_ones() -> None:
    view, _ = apply(new_saga(max_redispatches=0), Begin(), at(0))
    view, _ = apply(view, StepSucceeded(0, 1, {"r": 1}), at(1))
    view, _ = apply(view, StepSucceeded(1, 2, {"p": 2}), at(2))
    assert not decide(view, Tick(), at(4.9)).accepted
    view, decision = apply(view, Tick(), at(5))
    assert decision.commands == (RunCompensation(2, 4),)
    assert [c.new for c in decision.step_changes] == [
        StepStatus.TIMED_OUT,
        StepStatus.SKIPPED,
        StepStatus.COMPENSATING,
    ]
    view, decision = apply(view, CompensationSucceeded(2, 4), at(6))
    assert decision.commands == (RunCompensation(1, 5),)


def test_a_late_reply_after_the_timeout_is_ignored_and_called_late() -> None:
    view, _ = apply(new_saga(max_redispatches=0), Begin(), at(0))
    view, _ = apply(view, Tick(), at(3))
    late = decide(view, StepSucceeded(0, 1, {"r": 1}), at(4))
    assert not late.accepted
    assert "late" in late.note


def test_the_saga_deadline_times_out_the_current_step() -> None:
    view, _ = apply(new_saga(timeouts=(10, 10, 10, 10), deadline=4), Begin(), at(0))
    view, _ = apply(view, StepSucceeded(0, 1, {"r": 1}), at(2))
    view, decision = apply(view, Tick(), at(4))
    assert "saga deadline" in (decision.reason or "")
    assert decision.state == SagaState.COMPENSATING
    assert decision.commands == (RunCompensation(1, 3),)


def test_a_deadline_passed_before_admission_fails_without_compensating() -> None:
    view, waiting = apply(new_saga(deadline=4), Begin(admit=False), at(0))
    assert waiting.commands == () and not waiting.admitted
    assert waiting.due_at == at(4)
    view, decision = apply(view, Tick(), at(4))
    assert decision.state == SagaState.FAILED
    assert decision.commands == ()


def test_admit_starts_a_waiting_saga_once() -> None:
    view, _ = apply(new_saga(), Begin(admit=False), at(0))
    view, admitted = apply(view, Admit(), at(5))
    assert admitted.admitted and admitted.commands == (RunStep(0, 1),)
    assert admitted.step_changes[0].deadline_at == at(8)
    assert not decide(view, Admit(), at(6)).accepted


def test_a_silent_compensation_is_resent_then_given_up() -> None:
    view, _ = apply(new_saga(timeouts=(3, 3, 3, 3)), Begin(), at(0))
    view, _ = apply(view, StepSucceeded(0, 1, {"r": 1}), at(0.5))
    view, _ = apply(view, Tick(), at(1.5))  # re-send step 1
    view, _ = apply(view, Tick(), at(2.5))
    view, _ = apply(view, Tick(), at(3.5))  # step 1 timed out: compensate it
    assert view.state == SagaState.COMPENSATING and view.current_step == 1
    sends = []
    now = 3.5
    while view.state == SagaState.COMPENSATING:
        now += 1
        view, decision = apply(view, Tick(), at(now))
        sends.append(decision.commands)
    assert sends[:2] == [(RunCompensation(1, 3),), (RunCompensation(1, 3),)]
    assert view.state == SagaState.COMPENSATION_FAILED
    assert view.steps[1].status == StepStatus.COMPENSATION_FAILED


def test_settled_sagas_are_never_due() -> None:
    view, _ = apply(new_saga(timeouts=(3, None, None, None)), Begin(), at(0))
    for i in range(4):
        view, decision = apply(view, StepSucceeded(i, i + 1, {}), at(i + 0.1))
    assert decision.state == SagaState.COMPLETED
    assert decision.due_at is None
    assert not decide(view, Tick(), at(1000)).accepted


def test_a_started_step_is_not_resent_and_only_its_deadline_is_watched() -> None:
    view, _ = apply(new_saga(), Begin(), at(0))
    started = SagaView(
        view.saga_id,
        view.name,
        view.state,
        view.current_step,
        view.token,
        (replace(view.steps[0], started=True), *view.steps[1:]),
        view.deadline_at,
        view.max_redispatches,
    )
    decision = decide(started, Tick(), at(1))
    assert decision.accepted and decision.commands == () and decision.transitions == ()
    assert decision.due_at == at(3)
    timed_out = decide(started, Tick(), at(3))
    assert timed_out.step_changes[0].new == StepStatus.TIMED_OUT
