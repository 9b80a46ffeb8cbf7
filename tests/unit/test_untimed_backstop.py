"""Steps without a timeout (``timeout=None``) have a backstop too: a message no worker
began is re-sent after ``untimed_resend`` (doubling), and a begun step whose worker
stopped beating for ``heartbeat_lease`` is re-sent (then timed out after
``max_redispatches`` silent sends, as a timed step is). The heartbeat itself: the pure
marker choice, the memory store's refresh, the thread, and the runner's retry wait."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from test_tick import apply, at, begun, idle, new_saga

from celery_sagas.coordinator import Coordinator
from celery_sagas.definition import (
    RetryPolicy,
    Saga,
    Step,
    StepContext,
    idempotency_key,
    registry,
)
from celery_sagas.errors import SagaConfigurationError
from celery_sagas.heartbeat import Heartbeats, held_markers
from celery_sagas.machine import (
    Begin,
    RunCompensation,
    RunStep,
    SagaState,
    StepStatus,
    StepSucceeded,
    Tick,
    decide,
)
from celery_sagas.machine.types import own_deadline
from celery_sagas.protocols import STARTED, Expectation
from celery_sagas.runner import RetryLater, StepMessage, StepRunner
from celery_sagas.settings import HEARTBEATS_MISSED, SagaSettings
from celery_sagas.testing import InMemorySagaStore

UNTIMED = (None, None, None, None)


def untimed_saga(resend: float | None = 10.0, lease: float | None = 30.0, **kw: object):  # type: ignore[no-untyped-def]
    return replace(
        new_saga(timeouts=UNTIMED, **kw),  # type: ignore[arg-type]
        untimed_resend=resend,
        heartbeat_lease=lease,
    )


# -- the machine ------------------------------------------------------------------------


def test_an_untimed_step_no_worker_began_is_resent_backing_off() -> None:
    view, begin = apply(untimed_saga(), Begin(), at(0))
    assert begin.due_at == at(10)
    sends = []
    for _ in range(5):
        now = view.steps[0].redispatch_at
        assert now is not None
        assert idle(decide(view, Tick(), now - timedelta(seconds=0.01)))
        view, decision = apply(view, Tick(), now)
        assert decision.commands == (RunStep(0, 1),)  # the same token: the guard dedupes
        sends.append((now - at(0)).total_seconds())
    assert sends == [10, 30, 70, 150, 310]  # 10 s, doubling
    assert view.steps[0].status == StepStatus.RUNNING and view.state == SagaState.STARTED


def test_without_an_untimed_resend_nothing_watches_an_unbegun_untimed_step() -> None:
    """The old behaviour, kept when the setting is off (the pure machine's default)."""
    _, begin = apply(untimed_saga(resend=None, lease=None), Begin(), at(0))
    assert begin.due_at is None and begin.step_changes[0].redispatch_at is None


def test_a_begun_untimed_step_is_watched_while_its_worker_beats() -> None:
    view, _ = apply(untimed_saga(), Begin(), at(0))
    view = begun(view, 5)
    watched = decide(view, Tick(), at(10))
    assert idle(watched) and watched.due_at == at(35)  # last beat at 5 + lease 30
    for beat in (30, 60, 90):  # the heartbeat moves began_at on: never silent
        view = begun(view, beat)
        assert idle(decide(view, Tick(), at(beat + 29.9)))


def test_a_begun_untimed_step_whose_worker_stopped_beating_is_resent_then_timed_out() -> None:
    view, _ = apply(untimed_saga(max_redispatches=1), Begin(), at(0))
    view, resent = apply(begun(view, 5), Tick(), at(35))
    assert resent.commands == (RunStep(0, 1),)
    assert "no outcome after its time limit" in resent.transitions[0].reason
    view, timed_out = apply(begun(view, 40), Tick(), at(100))
    assert timed_out.step_changes[0].new == StepStatus.TIMED_OUT
    assert "no heartbeat from its worker for 30s, 2 send(s)" in (timed_out.reason or "")
    assert timed_out.commands == (RunCompensation(0, 2),)  # it may have acted


def test_an_untimed_compensation_whose_worker_stopped_beating_is_resent_never_timed_out() -> None:
    view, _ = apply(untimed_saga(max_redispatches=0), Begin(), at(0))
    view, _ = apply(view, StepSucceeded(0, 1, {"r": 1}), at(1))
    view, _ = apply(begun(view, 1), Tick(), at(31))  # step 1's worker went silent
    assert view.state == SagaState.COMPENSATING and view.current_step == 1
    for n in range(8):  # each send begun, then its worker died: sent again, backing off
        beat = 1000.0 * (n + 1)
        view = begun(view, beat)
        assert idle(decide(view, Tick(), at(beat + 29)))
        resend_at = view.steps[1].redispatch_at
        assert resend_at is not None
        view, decision = apply(view, Tick(), max(resend_at, at(beat + 30)))
        assert decision.commands == (RunCompensation(1, 3),)
    assert view.state == SagaState.COMPENSATING and decision.dead_letter is None


def test_own_deadline_of_an_untimed_step_is_its_last_beat_plus_the_lease() -> None:
    view = begun(untimed_saga(lease=12.0), 7)
    assert own_deadline(view.steps[0], view) == at(19)
    assert own_deadline(view.steps[1], view) is None  # not begun
    assert own_deadline(view.steps[0], replace(view, heartbeat_lease=None)) is None


def test_settings_derive_the_lease_and_refuse_nonpositive_intervals() -> None:
    settings = SagaSettings(database_url="sqlite://", heartbeat_interval=2.0)
    assert settings.heartbeat_lease == 2.0 * HEARTBEATS_MISSED
    for name in ("heartbeat_interval", "resend_untimed_after"):
        with pytest.raises(SagaConfigurationError, match=name):
            SagaSettings(database_url="sqlite://", **{name: 0})


# -- the heartbeat ----------------------------------------------------------------------


def test_held_markers_name_the_delivery_unless_two_run_one_key() -> None:
    running = Counter({("a", "d1"): 1, ("b", "d2"): 1, ("b", "d3"): 1, ("c", None): 2})
    assert held_markers(running) == {"a": "d1", "b": None, "c": None}


SAGA = Saga(
    "orders",
    [Step("s0", lambda c: 1, lambda c: None, timeout=None, retry_on=(ValueError,))],
)
T = datetime(2026, 1, 1, tzinfo=UTC)


def started_store(delivery: str) -> tuple[InMemorySagaStore, str]:
    store = InMemorySagaStore()
    saga_id = (
        Coordinator(store, registry([SAGA]), clock=lambda: T).start("orders", {"id": "o1"}).saga_id
    )
    key = idempotency_key(saga_id, "s0", "action")
    store.begin_step(key, saga_id, T, Expectation(0, 1, "action", SAGA.fingerprint), delivery)
    return store, key


def test_a_beat_refreshes_only_the_markers_still_held_by_their_delivery() -> None:
    store, key = started_store("d1")
    later = T + timedelta(seconds=40)
    beats = Heartbeats(lambda: store, 60.0, clock=lambda: later)
    with beats.beating(key, "d1"):
        assert beats.beat() == 1
    assert store.get_guard(key).recorded_at == later  # type: ignore[union-attr]
    assert beats.beat() == 0 and beats.running == 0  # finished: no longer beaten
    store.hand_over_started(key, "d1", "d2")  # a re-send's delivery took it over
    with beats.beating(key, "d1"):
        assert beats.beat() == 0


def test_the_heartbeat_thread_beats_every_interval() -> None:
    store, key = started_store("d1")
    ticks = iter(T + timedelta(seconds=s) for s in range(1, 10_000))
    beats = Heartbeats(lambda: store, 0.02, clock=lambda: next(ticks))
    with beats.beating(key, "d1"):
        deadline = time.monotonic() + 5
        while store.get_guard(key).recorded_at < T + timedelta(seconds=3):  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no heartbeat in 5 s"
            time.sleep(0.01)
    names = [t.name for t in threading.enumerate()]
    assert names.count("celery-sagas-heartbeat") >= 1


def test_a_failing_store_does_not_stop_the_heartbeat() -> None:
    calls = []

    class Broken:
        def beat_started(self, markers: object, at: datetime) -> int:
            calls.append(markers)
            raise OSError("database gone")

    beats = Heartbeats(lambda: Broken(), 60.0, clock=lambda: T)  # type: ignore[arg-type,return-value]
    with beats.beating("k", "d"):
        assert beats.beat() == 0 and beats.beat() == 0
    assert len(calls) == 2


def test_an_untimed_step_waiting_for_its_retry_counts_as_heard_from_until_then() -> None:
    """A retry backoff longer than the lease is not silence: the marker takes the retry
    time (the scan then waits the lease after it)."""
    store, key = started_store("d0")
    saga_id = key.split(":")[0]
    beats = Heartbeats(lambda: store, 60.0, clock=lambda: T)

    def flaky(context: StepContext) -> None:
        raise ValueError("try later")

    runner = StepRunner(
        SAGA,
        0,
        "action",
        RetryPolicy(max_retries=3, backoff_base=600, backoff_cap=600, jitter=0),
        lambda: T,
        function=flaky,
        heartbeats=beats,
    )
    store.hand_over_started(key, "d0", None)
    message = StepMessage(saga_id, 0, 1, key)
    run = runner.run(store, message, delivery="d1")
    assert isinstance(run, RetryLater)
    guard = store.get_guard(key)
    assert guard is not None and guard.outcome == STARTED
    assert guard.recorded_at == run.when > T + timedelta(seconds=500)


def test_a_resent_copy_of_an_untimed_step_does_not_run_it_again_while_its_worker_beats() -> None:
    """A message waits in a busy queue past ``resend_untimed_after``: the scan sends a
    second copy (the same token). The first copy's worker begins the step and beats; the
    second copy reaches another worker while the step still runs. README: "the guard makes
    a second copy of a waiting message a no-op" — but it takes the marker over and runs
    the participant a second time, concurrently (an untimed step: a long batch job), and
    the first worker's beats no longer refresh the marker it lost."""
    store, key = started_store("d0")
    saga_id = key.split(":")[0]
    store.hand_over_started(key, "d0", None)  # sent, not begun
    beats = Heartbeats(lambda: store, 60.0, clock=lambda: T)
    calls: list[str] = []
    message = StepMessage(saga_id, 0, 1, key)

    def batch_job(context: StepContext) -> int:
        calls.append(context.idempotency_key)
        if len(calls) == 1:  # while it runs, the re-sent copy reaches another worker
            runner.run(store, message, delivery="d2")
        return 1

    runner = StepRunner(
        SAGA, 0, "action", RetryPolicy(), lambda: T, function=batch_job, heartbeats=beats
    )
    runner.run(store, message, delivery="d1")
    assert len(calls) == 1


def test_a_marker_silent_for_the_lease_or_held_by_this_delivery_is_taken() -> None:
    from celery_sagas.protocols import GuardRecord
    from celery_sagas.runner import RUNNING, running_elsewhere

    held = GuardRecord("k", STARTED, "d1", recorded_at=T)
    assert running_elsewhere(held, "d2", T + timedelta(seconds=89), 90.0).reason == RUNNING  # type: ignore[union-attr]
    assert running_elsewhere(held, "d2", T + timedelta(seconds=90), 90.0) is None  # gone
    assert running_elsewhere(held, "d1", T, 90.0) is None  # its own redelivery
    assert running_elsewhere(GuardRecord("k", STARTED, None, recorded_at=T), "d2", T, 90.0) is None
