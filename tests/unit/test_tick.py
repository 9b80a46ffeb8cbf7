"""The scanner's decisions (``Tick``) with an injected clock: no sleeping to wait for time."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from celery_sagas.machine import (
    Admit,
    Begin,
    CompensationSucceeded,
    Decision,
    ErrorKind,
    RunCompensation,
    RunStep,
    SagaState,
    SagaView,
    StepFailed,
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
    grace: float = 2.0,
    queue_timeout: float | None = None,
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
        time_limit_grace=grace,
        queue_timeout=queue_timeout,
    )


def apply(view: SagaView, event: object, now: datetime) -> tuple[SagaView, object]:
    """Apply a decision to the view, as the store would (a scan then reads the markers)."""
    decision = decide(view, event, now)  # type: ignore[arg-type]
    assert decision.accepted, decision.note
    steps = list(view.steps)
    for change in decision.step_changes:
        old = steps[change.index]
        live = change.new in (StepStatus.RUNNING, StepStatus.COMPENSATING)
        fresh = change.new != old.status
        steps[change.index] = replace(
            old,
            status=change.new,
            error_kind=change.error_kind or old.error_kind,
            deadline_at=(change.deadline_at or (old.deadline_at if not fresh else None))
            if live
            else None,
            redispatch_at=change.redispatch_at if live else None,
            dispatches=change.dispatches if change.dispatches is not None else old.dispatches,
            started=old.started and not fresh,
            began_at=old.began_at if not fresh else None,
        )
    new_view = replace(
        view,
        state=decision.state,
        current_step=decision.current_step,
        token=decision.token,
        steps=tuple(steps),
    )
    return new_view, decision


def begun(view: SagaView, seconds: float) -> SagaView:
    """A worker began the current step at ``seconds`` (its guard marker, as a scan reads)."""
    index = view.current_step
    step = replace(view.steps[index], started=True, began_at=at(seconds))
    return replace(view, steps=(*view.steps[:index], step, *view.steps[index + 1 :]))


def idle(decision: object) -> bool:
    """Nothing done: no message, no transition (at most the next look moves)."""
    return not decision.accepted or (  # type: ignore[attr-defined]
        decision.commands == () and decision.transitions == ()  # type: ignore[attr-defined]
    )


def test_begin_sets_the_resend_time_and_no_step_deadline() -> None:
    decision = decide(new_saga(), Begin(), at(0))
    running = decision.step_changes[0]
    assert running.deadline_at is None  # a step's own time starts when a worker begins it
    assert running.redispatch_at == at(1)  # timeout / (max_redispatches + 1)
    assert decision.due_at == at(1)


def test_a_queue_timeout_bounds_the_wait_for_a_worker() -> None:
    view, begin = apply(new_saga(queue_timeout=5), Begin(), at(0))
    assert begin.step_changes[0].deadline_at == at(5)
    view, _ = apply(view, Tick(), at(1))  # re-sent: the wait is not extended
    assert view.steps[0].deadline_at == at(5)
    view, decision = apply(view, Tick(), at(5))
    assert decision.step_changes[0].new == StepStatus.TIMED_OUT
    assert "no worker began it within 5s" in (decision.reason or "")


@pytest.mark.parametrize("now", [0, 0.5, 0.999])
def test_nothing_is_due_before_the_resend_time(now: float) -> None:
    view, _ = apply(new_saga(), Begin(), at(0))
    assert idle(decide(view, Tick(), at(now)))


def test_a_step_no_worker_began_is_resent_backing_off_and_never_timed_out() -> None:
    view, _ = apply(new_saga(), Begin(), at(0))
    sends = []
    now = 0.0
    for _ in range(6):
        now = view.steps[0].redispatch_at  # type: ignore[assignment]
        view, decision = apply(view, Tick(), now)
        assert decision.commands == (RunStep(0, 1),)  # the same token: the guard dedupes
        sends.append((now - T0).total_seconds())  # type: ignore[operator]
    assert sends == [1, 3, 7, 15, 31, 63]  # 1 s, doubling
    assert view.state == SagaState.STARTED and view.steps[0].status == StepStatus.RUNNING
    assert classify(decision).timed_out == 0


def test_a_started_step_times_out_its_own_time_after_it_began() -> None:
    view, _ = apply(new_saga(max_redispatches=0), Begin(), at(0))
    view = begun(view, 10)  # waited 10 s in a busy queue: that is not the step's time
    watched = decide(view, Tick(), at(11))
    assert idle(watched) and watched.due_at == at(15)  # began + timeout 3 + grace 2
    assert idle(decide(view, Tick(), at(14.9)))
    view, timed_out = apply(view, Tick(), at(15))
    assert timed_out.state == SagaState.COMPENSATING
    assert timed_out.step_changes[0].new == StepStatus.TIMED_OUT
    assert timed_out.step_changes[0].error_kind == ErrorKind.TIMEOUT
    assert "no reply within 5s of starting" in (timed_out.reason or "")
    # the timed-out step may have acted: it is compensated itself
    assert timed_out.commands == (RunCompensation(0, 2),)
    assert classify(timed_out).timed_out == 1


def test_a_started_step_silent_past_its_limit_is_resent_first() -> None:
    """Its worker may have died (a retry message lost with it): send it again, up to
    ``max_redispatches`` times, before timing it out."""
    view, _ = apply(new_saga(max_redispatches=1), Begin(), at(0))
    view, resent = apply(begun(view, 0), Tick(), at(5))
    assert resent.commands == (RunStep(0, 1),)
    assert "no outcome after its time limit" in resent.transitions[0].reason
    view, timed_out = apply(begun(view, 6), Tick(), at(11))
    assert timed_out.step_changes[0].new == StepStatus.TIMED_OUT


def test_a_timed_out_middle_step_compensates_itself_then_the_earlier_ones() -> None:
    view, _ = apply(new_saga(max_redispatches=0), Begin(), at(0))
    view, _ = apply(view, StepSucceeded(0, 1, {"r": 1}), at(1))
    view, _ = apply(view, StepSucceeded(1, 2, {"p": 2}), at(2))
    view = begun(view, 2)
    assert idle(decide(view, Tick(), at(6.9)))
    view, decision = apply(view, Tick(), at(7))
    assert decision.commands == (RunCompensation(2, 4),)
    assert [c.new for c in decision.step_changes] == [
        StepStatus.TIMED_OUT,
        StepStatus.SKIPPED,
        StepStatus.COMPENSATING,
    ]
    view, decision = apply(view, CompensationSucceeded(2, 4), at(8))
    assert decision.commands == (RunCompensation(1, 5),)


def test_a_late_reply_after_the_timeout_is_ignored_and_called_late() -> None:
    view, _ = apply(new_saga(max_redispatches=0), Begin(), at(0))
    view, _ = apply(begun(view, 0), Tick(), at(5))
    late = decide(view, StepSucceeded(0, 1, {"r": 1}), at(6))
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
    assert admitted.step_changes[0].redispatch_at == at(6)
    assert not decide(view, Admit(), at(6)).accepted


def _compensating_step_1() -> SagaView:
    view, _ = apply(new_saga(max_redispatches=0), Begin(), at(0))
    view, _ = apply(view, StepSucceeded(0, 1, {"r": 1}), at(0.5))
    view, _ = apply(begun(view, 0.5), Tick(), at(5.5))  # step 1 timed out: compensate it
    assert view.state == SagaState.COMPENSATING and view.current_step == 1
    return view


def test_a_compensation_no_worker_began_is_resent_and_never_dead_lettered() -> None:
    view = _compensating_step_1()
    for _ in range(20):  # a busy queue: waiting is not failing
        view, decision = apply(view, Tick(), view.steps[1].redispatch_at)  # type: ignore[arg-type]
        assert decision.commands == (RunCompensation(1, 3),)
    assert view.state == SagaState.COMPENSATING
    assert view.steps[1].status == StepStatus.COMPENSATING
    assert decision.dead_letter is None


def test_a_compensation_that_began_is_watched_then_resent_if_it_went_silent() -> None:
    view = begun(_compensating_step_1(), 6)
    watched = decide(view, Tick(), at(7))
    assert idle(watched) and watched.due_at == at(11)
    view, resent = apply(view, Tick(), at(11))
    assert resent.commands == (RunCompensation(1, 3),)
    assert view.state == SagaState.COMPENSATING


def test_settled_sagas_are_never_due() -> None:
    view, _ = apply(new_saga(timeouts=(3, None, None, None)), Begin(), at(0))
    for i in range(4):
        view, decision = apply(view, StepSucceeded(i, i + 1, {}), at(i + 0.1))
    assert decision.state == SagaState.COMPLETED
    assert decision.due_at is None
    assert not decide(view, Tick(), at(1000)).accepted


def _timed_out_by_deadline_before_admission() -> Decision:
    view, _ = apply(new_saga(deadline=4), Begin(admit=False), at(0))
    return decide(view, Tick(), at(4))  # step 0 is skipped, not timed out: it never ran


def _timed_out_waiting_for_a_worker() -> Decision:
    view, _ = apply(new_saga(queue_timeout=5), Begin(), at(0))
    return decide(view, Tick(), at(5))


def _timed_out_after_it_began() -> Decision:
    view, _ = apply(new_saga(max_redispatches=0), Begin(), at(0))
    return decide(begun(view, 0), Tick(), at(5))


def _timed_out_by_the_saga_deadline() -> Decision:
    view, _ = apply(new_saga(timeouts=(10, 10, 10, 10), deadline=4), Begin(), at(0))
    return decide(view, Tick(), at(4))


def _interrupted_at_its_time_limit() -> Decision:
    view, _ = apply(new_saga(), Begin(), at(0))
    return decide(view, StepFailed(0, 1, "soft limit", business=False, timed_out=True), at(1))


def _resent() -> Decision:
    view, _ = apply(new_saga(), Begin(), at(0))
    return decide(view, Tick(), at(1))


def _resent_after_its_worker_went_silent() -> Decision:
    view, _ = apply(new_saga(max_redispatches=1), Begin(), at(0))
    return decide(begun(view, 0), Tick(), at(5))


def _failed() -> Decision:
    view, _ = apply(new_saga(), Begin(), at(0))
    return decide(view, StepFailed(0, 1, "declined", business=True), at(1))


def _compensation_resent() -> Decision:
    view = _compensating_step_1()
    return decide(view, Tick(), view.steps[1].redispatch_at)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "timed_out"),
    [
        (_timed_out_by_deadline_before_admission, True),
        (_timed_out_waiting_for_a_worker, True),
        (_timed_out_after_it_began, True),
        (_timed_out_by_the_saga_deadline, True),
        (_interrupted_at_its_time_limit, True),
        (_resent, False),
        (_resent_after_its_worker_went_silent, False),
        (_failed, False),
        (_compensation_resent, False),
    ],
)
def test_a_decision_says_whether_it_timed_the_step_out(make: object, timed_out: bool) -> None:
    decision = make()  # type: ignore[operator]
    assert decision.accepted
    assert decision.timed_out is timed_out


def test_the_scan_counts_timeouts_by_the_flag_not_by_the_reason_text() -> None:
    skipped = _timed_out_by_deadline_before_admission()
    assert StepStatus.TIMED_OUT not in [c.new for c in skipped.step_changes]
    assert classify(skipped).timed_out == 1
    reworded = replace(skipped, reason="ran out of time")
    assert classify(reworded).timed_out == 1
    named_deadline = replace(_failed(), reason="deadline_check failed: declined")
    assert classify(named_deadline).timed_out == 0
