"""Timed steps in inline runs: a step message's budget (``inline.budget``), which
deliveries may divide it (``InlineSteps.begin``), which timed steps fit in what is left
(``InlineRun.fits``), the worker's own per-step alarm (``alarm.step_limits``) and what the
runner makes of it. The alarm runs for real here (SIGALRM in the test's main thread)."""

from __future__ import annotations

import signal
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from test_inline_rules import app_with, request, saga_of, step_message

from celery_sagas.definition import RetryPolicy
from celery_sagas.errors import StepHardLimitExceeded
from celery_sagas.integration.alarm import POOL_ENV, alarm_usable, step_limits
from celery_sagas.integration.inline import MARGIN, InlineRun, budget
from celery_sagas.machine import Role
from celery_sagas.protocols import GuardOutcome, OutboxMessage
from celery_sagas.runner import Finished, RetryLater, StepRunner

NOW = datetime(2026, 1, 1, tzinfo=UTC)


# -- the budget ---------------------------------------------------------------------------


def test_an_actions_budget_covers_the_timed_actions_after_it_and_every_compensation() -> None:
    timeouts = (10.0, 20.0, 30.0)
    # actions 0..2, then compensations 2..0, each at its timeout + grace 1
    assert budget(timeouts, 1.0, Role.ACTION, 0) == MARGIN + 63 + 63
    assert budget(timeouts, 1.0, Role.ACTION, 2) == MARGIN + 31 + 63


def test_a_compensations_budget_covers_it_and_the_compensations_below() -> None:
    assert budget((10.0, 20.0, 30.0), 1.0, Role.COMPENSATION, 1) == MARGIN + 11 + 21


def test_an_untimed_step_ends_the_forward_run_and_has_no_budget_itself() -> None:
    timeouts = (10.0, None, 30.0)
    assert budget(timeouts, 1.0, Role.ACTION, 1) is None
    assert budget(timeouts, 1.0, Role.ACTION, 0) == MARGIN + 11 + 11 + 31


# -- which deliveries divide a budget, which steps fit ------------------------------------


@pytest.fixture
def prefork_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(POOL_ENV, "prefork")


def test_a_budgeted_delivery_in_a_prefork_child_times_each_step_itself(
    prefork_child: None,
) -> None:
    app = app_with(saga_of(5.0, 5.0))
    inline = app._celery_sagas_runtime.inline
    run = inline.begin(app.tasks["orders.s0"], request(timelimit=(40.0, 40.0)))
    assert run is not None and (run.hard, run.alarm) == (40.0, True)
    assert run.limits(app.tasks["orders.s0"]) is not None
    assert inline.follow_up(step_message(saga_of(5.0, 5.0), 1), run) is not None


@pytest.mark.parametrize(
    "timelimit", [(40.0, 30.0), (None, 5.0), (15.0, None)], ids=["unequal", "soft", "hard"]
)
def test_celerys_own_limits_are_not_a_budget(prefork_child: None, timelimit: Any) -> None:
    app = app_with(saga_of(5.0, 5.0))
    inline = app._celery_sagas_runtime.inline
    assert inline.begin(app.tasks["orders.s0"], request(timelimit=timelimit)) is None


def test_a_timed_step_without_a_budget_runs_under_celerys_limits(prefork_child: None) -> None:
    """A message with no limits of its own (an app without inline_steps published it, or a
    retry from an inline run): the task's limits are Celery's, per delivery."""
    app = app_with(saga_of(5.0, 5.0))
    assert app._celery_sagas_runtime.inline.begin(app.tasks["orders.s0"], request()) is None


def test_outside_a_prefork_child_a_budget_is_not_divided(monkeypatch: pytest.MonkeyPatch) -> None:
    for pool in ("threads", "solo"):
        monkeypatch.setenv(POOL_ENV, pool)
        assert not alarm_usable()
        app = app_with(saga_of(5.0, 5.0))
        run = app._celery_sagas_runtime.inline.begin(
            app.tasks["orders.s0"], request(timelimit=(40.0, 40.0))
        )
        assert run is None


def test_under_gevent_a_budgeted_steps_own_hard_limit_holds_and_nothing_timed_is_inline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Celery's gevent pool gives a step its hard limit (a ``gevent.Timeout``): a budget
    in its place would let a hung step run on; the worker arms the step's own instead."""
    monkeypatch.setenv(POOL_ENV, "gevent")
    saga = saga_of(5.0, 5.0)
    app = app_with(saga)
    inline = app._celery_sagas_runtime.inline
    run = inline.begin(app.tasks["orders.s0"], request(timelimit=(40.0, 40.0)))
    assert run is not None and (run.alarm, run.green) == (False, True)
    assert inline.follow_up(step_message(saga, 1), run) is None
    limits = run.limits(app.tasks["orders.s0"])
    assert limits is not None and limits.args == (app.tasks["orders.s0"].time_limit,)


def test_a_green_hard_limit_interrupts_the_greenlet() -> None:
    import gevent

    from celery_sagas.integration.alarm import green_hard_limit

    def hung() -> str:
        try:
            with green_hard_limit(0.05):
                gevent.sleep(5)
        except StepHardLimitExceeded:
            return "interrupted"
        return "ran on"

    assert gevent.spawn(hung).get(timeout=2) == "interrupted"


def test_a_timed_step_fits_only_while_its_hard_limit_fits_in_what_is_left() -> None:
    app = app_with(saga_of(5.0, 5.0))
    inline = app._celery_sagas_runtime.inline
    second = app.tasks["orders.s1"]  # soft 5, hard 5 + grace 10 = 15
    fresh = InlineRun(inline, "celery", "d", hard=40.0, alarm=True)
    assert fresh.fits(second)
    late = InlineRun(inline, "celery", "d", hard=40.0, alarm=True, began=time.monotonic() - 25)
    assert not late.fits(second)  # 25 s gone + 15 + margin > 40
    assert not InlineRun(inline, "celery", "d", hard=40.0, alarm=False).fits(second)
    assert not InlineRun(inline, "celery", "d", alarm=True).fits(second)  # no budget


def test_an_untimed_step_runs_inline_only_in_a_delivery_without_a_limit() -> None:
    app = app_with(saga_of(5.0, None))
    inline = app._celery_sagas_runtime.inline
    untimed = app.tasks["orders.s1"]
    assert InlineRun(inline, "celery", "d").fits(untimed)
    assert not InlineRun(inline, "celery", "d", hard=40.0, alarm=True).fits(untimed)


def test_an_inline_mode_app_publishes_a_timed_steps_message_with_its_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the app's own in-memory broker: ``CELERY_BROKER_URL`` (which the full suite sets,
    and Celery reads before the app's config) would send it to a shared Redis."""
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    saga = saga_of(5.0, 7.0, queue="budget-check")  # memory:// queues are process-wide
    app = app_with(saga)
    runtime = app._celery_sagas_runtime
    body = step_message(saga, 0).body
    runtime.dispatcher.send(OutboxMessage("s-1", body, id=1))
    with app.connection_for_read() as conn:
        message = conn.SimpleQueue("budget-check").get(timeout=5)
        hard, soft = message.headers["timelimit"]
        message.ack()
    expected = budget((5.0, 7.0), runtime.settings.time_limit_grace, Role.ACTION, 0)
    assert hard == soft == expected


# -- the alarm ----------------------------------------------------------------------------


def test_the_alarm_interrupts_at_the_soft_limit_and_is_disarmed_after() -> None:
    before = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded), step_limits(0.05, 0.5):
        time.sleep(5)
    assert time.monotonic() - started < 1
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before


def test_a_participant_that_swallows_the_soft_limit_gets_the_hard_one() -> None:
    started = time.monotonic()
    with pytest.raises(StepHardLimitExceeded), step_limits(0.05, 0.15):
        try:
            time.sleep(5)
        except Exception:  # a stubborn participant
            time.sleep(5)
    assert 0.1 < time.monotonic() - started < 1
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_step_that_finishes_in_time_is_not_interrupted() -> None:
    with step_limits(0.5, 1.0):
        time.sleep(0.01)
    time.sleep(0.6)  # nothing left armed


# -- the runner under the alarm -----------------------------------------------------------


def _runner(function: Any, role: Role = Role.ACTION) -> StepRunner:
    saga = saga_of(5.0)
    policy = RetryPolicy(max_retries=1)  # interrupted: what the step task passes (runtime)
    return StepRunner(saga, 0, role, policy, lambda: NOW, (SoftTimeLimitExceeded,), function)


def _message() -> Any:
    from celery_sagas.runner import StepMessage

    return StepMessage("s-1", 0, 1, "s-1:s0:action")


def _hang(context: Any) -> None:
    time.sleep(5)


def _stubborn(context: Any) -> None:
    try:
        time.sleep(5)
    except Exception:
        time.sleep(5)


@pytest.mark.parametrize("function", [_hang, _stubborn], ids=["hung", "stubborn"])
def test_an_action_interrupted_by_the_alarm_timed_out(function: Any) -> None:
    run = _runner(function)._call(None, _message(), None, 1, lambda: step_limits(0.05, 0.1))
    assert isinstance(run, Finished) and run.reply.timed_out
    assert run.to_record is not None and run.to_record.outcome == GuardOutcome.ERROR


def test_a_compensation_interrupted_by_the_alarm_is_retried() -> None:
    runner = _runner(_stubborn, Role.COMPENSATION)
    run = runner._call(None, _message(), None, 1, lambda: step_limits(0.05, 0.1))
    assert isinstance(run, RetryLater)


def test_the_alarm_reaches_the_main_thread_while_a_heartbeat_thread_runs() -> None:
    """The heartbeat thread blocks SIGALRM: the kernel must not hand the alarm to it,
    where it would not interrupt the participant's sleep in the main thread."""
    from celery_sagas.heartbeat import keep_signals_off_this_thread

    blocked: list[bool] = []

    def check() -> None:
        keep_signals_off_this_thread()
        blocked.append(signal.SIGALRM in signal.pthread_sigmask(signal.SIG_BLOCK, set()))

    thread = threading.Thread(target=check)
    thread.start()
    thread.join()
    assert blocked == [True]
    assert signal.SIGALRM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # main: not
    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded), step_limits(0.05, 0.5):
        time.sleep(5)
    assert time.monotonic() - started < 1


def test_a_budget_replaces_app_and_worker_limits_so_each_step_keeps_its_own(
    prefork_child: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery takes a message's limits over the app's and the worker's: under a budget the
    worker must arm the step's own limits even where app- or worker-wide limits stop an
    unbudgeted delivery's inline runs."""
    from celery_sagas.integration.inline import WORKER_LIMITED

    app = app_with(saga_of(5.0, None), task_time_limit=60)
    inline = app._celery_sagas_runtime.inline
    run = inline.begin(app.tasks["orders.s0"], request(timelimit=(40.0, 40.0)))
    assert run is not None and run.limits(app.tasks["orders.s0"]) is not None
    monkeypatch.setenv(WORKER_LIMITED, "1")
    run = inline.begin(app.tasks["orders.s0"], request(timelimit=(40.0, 40.0)))
    assert run is not None and run.alarm
    assert inline.begin(app.tasks["orders.s1"], request()) is None  # untimed, worker-limited


# -- review: failure paths -----------------------------------------------------------------


def test_a_timed_step_runs_inline_only_under_a_budget() -> None:
    """After an untimed step the delivery has no Celery limit: a timed step run there has
    only the alarm, and nothing replaces a pool child stuck where Python cannot raise
    (where a published step has Celery's hard limit, as it had before inline mode)."""
    app = app_with(saga_of(None, 5.0))
    inline = app._celery_sagas_runtime.inline
    assert not InlineRun(inline, "celery", "d", alarm=True).fits(app.tasks["orders.s1"])


def test_an_alarm_due_as_the_step_ends_leaves_nothing_armed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The step's timer expires just as its limits are taken down (the participant
    returned at its timeout): the handler then runs inside the teardown. It must not
    re-arm the timer and abort the teardown, leaving its handler installed and the hard
    alarm armed to go off ``grace`` later in our own code (recording the outcome,
    publishing, the next step)."""
    before = signal.getsignal(signal.SIGALRM)
    real = signal.setitimer

    def expired_just_before(which: int, seconds: float, interval: float = 0.0) -> Any:
        if seconds == 0:  # disarming: the timer went off an instant earlier
            signal.raise_signal(signal.SIGALRM)
        return real(which, seconds, interval)

    monkeypatch.setattr(signal, "setitimer", expired_just_before)
    try:
        try:
            with step_limits(5.0, 10.0):
                pass
        except SoftTimeLimitExceeded:
            pass  # the step counts as timed out: acceptable, it ended at its limit
        monkeypatch.undo()
        armed = signal.getitimer(signal.ITIMER_REAL)
        handler = signal.getsignal(signal.SIGALRM)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
    assert armed == (0.0, 0.0)
    assert handler is before


WATCHED = """
import sys, time
from celery_sagas.integration.alarm import step_limits
marker = sys.argv[1]
def record():
    open(marker, "w").write("recorded")
deaf = sys.argv[2] == "deaf"
with step_limits(0.05, 0.1, record):
    until = time.monotonic() + (30 if deaf else 0.01)
    while time.monotonic() < until:
        try:
            time.sleep(max(0.0, until - time.monotonic()))
        except BaseException:  # deaf to both limits, as a call stuck in C code is
            continue
time.sleep(1.5)  # past the watchdog's deadline: disarmed, nothing happens
print("lived")
"""


@pytest.mark.parametrize("deaf", [True, False], ids=["deaf", "in-time"])
def test_the_watchdog_records_then_kills_a_process_stuck_past_its_hard_limit(
    deaf: bool, tmp_path: Any
) -> None:
    """Run in a process of its own (it is SIGKILLed): the record callback runs first."""
    import subprocess
    import sys

    marker = tmp_path / "recorded"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", WATCHED, str(marker), "deaf" if deaf else "quick"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if deaf:
        assert done.returncode == -signal.SIGKILL, done.stderr
        assert marker.read_text() == "recorded"
        assert time.monotonic() - started < 10
    else:
        assert (done.returncode, done.stdout.strip()) == (0, "lived"), done.stderr
        assert not marker.exists()
