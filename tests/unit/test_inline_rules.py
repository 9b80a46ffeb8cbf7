"""``inline_steps``' pure parts: which deliveries and which next steps run inline, the
``Abandoned`` decision, and how a redelivered message tells its own dead step
(``runner.abandoned_by``) on the in-memory store."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

from celery_sagas import install
from celery_sagas.coordinator import Coordinator
from celery_sagas.definition import RetryPolicy, Saga, Step, registry
from celery_sagas.errors import SagaConfigurationError
from celery_sagas.integration.inline import (
    InlineRun,
    InlineSteps,
    is_step_message,
    time_limited,
)
from celery_sagas.machine import (
    Abandoned,
    RunCompensation,
    RunStep,
    SagaState,
    SagaView,
    StepStatus,
    StepView,
    decide,
)
from celery_sagas.protocols import GuardRecord, OutboxMessage
from celery_sagas.runner import Ignored, Resend, StepMessage, StepRunner, abandoned_by
from celery_sagas.settings import SagaSettings
from celery_sagas.testing import InMemorySagaStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def noop(ctx: Any) -> None:
    return None


def saga_of(*timeouts: float | None, name: str = "orders", queue: str | None = None) -> Saga:
    steps = [
        Step(f"s{i}", noop, noop, compensation_name=f"u{i}", timeout=t, queue=queue)
        for i, t in enumerate(timeouts)
    ]
    return Saga(name, steps)


def app_with(*sagas: Saga, **conf: Any) -> Celery:
    app = Celery("inline-unit", broker="memory://")
    app.conf.update(conf)
    install(app, list(sagas), database_url="sqlite://", inline_steps=True)
    return app


def request(**fields: Any) -> Any:
    values = {
        "called_directly": False,
        "is_eager": False,
        "timelimit": (None, None),
        "delivery_info": {"routing_key": "celery"},
        "id": "task-1",
    }
    return SimpleNamespace(**{**values, **fields})


def on(inline: InlineSteps, queue: str, **fields: Any) -> InlineRun:
    """A delivery from ``queue`` (no limit, no alarm unless ``fields`` say so)."""
    return InlineRun(inline, queue, "task-1", **fields)


def step_message(saga: Saga, index: int, kind: str = "action", saga_id: str = "s-1") -> Any:
    body = {
        "kind": kind,
        "saga": saga.name,
        "saga_id": saga_id,
        "step": index,
        "token": 1,
        "key": f"{saga_id}:{saga.steps[index].name}:{kind}",
    }
    return OutboxMessage(saga_id, body, id=1)


# --- which deliveries, which steps ---------------------------------------------------------


def test_time_limited_is_any_limit_set() -> None:
    assert not time_limited(None, None, 0)
    assert time_limited(None, 300.0)


def test_hooks_and_dead_letters_are_not_step_messages() -> None:
    assert is_step_message({"kind": "action", "key": "k"})
    assert is_step_message({"kind": "compensation", "key": "k"})
    assert not is_step_message({"kind": "hook", "key": "k"})
    assert not is_step_message({"kind": "dead_letter"})


def test_a_delivery_without_time_limits_on_its_queue_runs_steps_inline() -> None:
    saga = saga_of(None, None)
    app = app_with(saga)
    inline: InlineSteps = app._celery_sagas_runtime.inline
    first = app.tasks["orders.s0"]
    run = inline.begin(first, request())
    assert run is not None and (run.queue, run.delivery) == ("celery", "task-1")
    task, kwargs = inline.follow_up(step_message(saga, 1), on(inline, "celery")) or (None, None)
    assert task is app.tasks["orders.s1"]
    assert kwargs == {"saga_id": "s-1", "step": 1, "token": 1, "key": "s-1:s1:action"}
    undo = inline.follow_up(step_message(saga, 0, "compensation"), on(inline, "celery"))
    assert undo is not None and undo[0] is app.tasks["orders.u0"]


@pytest.mark.parametrize(
    "fields",
    [
        {"called_directly": True},
        {"is_eager": True},
        {"timelimit": (30.0, None)},
        {"timelimit": (None, 20.0)},
    ],
    ids=["called-directly", "eager", "message-hard-limit", "message-soft-limit"],
)
def test_a_delivery_that_is_not_a_worker_delivery_or_has_a_limit_runs_nothing_inline(
    fields: dict[str, Any],
) -> None:
    app = app_with(saga_of(None, None))
    assert app._celery_sagas_runtime.inline.begin(app.tasks["orders.s0"], request(**fields)) is None


def test_a_task_or_app_time_limit_stops_inline_runs() -> None:
    limited = saga_of(30.0, 30.0)  # the steps' own timeouts: Celery limits per delivery
    app = app_with(limited)
    inline = app._celery_sagas_runtime.inline
    assert inline.begin(app.tasks["orders.s0"], request()) is None
    assert inline.follow_up(step_message(limited, 1), on(inline, "celery")) is None
    worker_limit = app_with(saga_of(None, None), task_time_limit=60)
    inline = worker_limit._celery_sagas_runtime.inline
    assert inline.begin(worker_limit.tasks["orders.s0"], request()) is None


def test_a_step_routed_to_another_queue_is_published() -> None:
    saga = saga_of(None, None, queue="payments")
    app = app_with(saga)
    inline = app._celery_sagas_runtime.inline
    assert inline.follow_up(step_message(saga, 1), on(inline, "celery")) is None
    assert inline.follow_up(step_message(saga, 1), on(inline, "payments")) is not None


def test_a_delivery_keeps_only_a_step_of_its_own_saga() -> None:
    saga = saga_of(None, None)
    app = app_with(saga)
    run = app._celery_sagas_runtime.inline.begin(app.tasks["orders.s0"], request())
    pick = run.picks("s-1")
    picked = pick(step_message(saga, 1))
    assert picked is not None and picked[0] is app.tasks["orders.s1"]
    assert pick(step_message(saga, 0, saga_id="s-2")) is None  # admitted by a freed slot
    hook = OutboxMessage("s-1", {"kind": "hook", "saga_id": "s-1", "key": "k"}, id=2)
    assert pick(hook) is None


def test_inline_steps_needs_the_default_mode() -> None:
    with pytest.raises(SagaConfigurationError, match="inline_steps"):
        SagaSettings(database_url="", coordinator_hop=True, signing_key="k", inline_steps=True)


# --- the Abandoned decision ------------------------------------------------------------------


def view(state: SagaState, statuses: list[StepStatus], current: int, token: int) -> SagaView:
    steps = tuple(StepView(i, f"s{i}", status) for i, status in enumerate(statuses))
    return SagaView("s-1", "orders", state, current, token, steps)


def test_an_abandoned_running_step_is_sent_again_with_its_token() -> None:
    running = view(SagaState.PENDING, [StepStatus.COMPLETED, StepStatus.RUNNING], 1, 2)
    decision = decide(running, Abandoned(1, 2, "its delivery died"), NOW)
    assert decision.accepted
    assert decision.commands == (RunStep(1, 2),)
    assert decision.state == SagaState.PENDING and decision.token == 2
    [change] = decision.step_changes
    assert (change.new, change.dispatches) == (StepStatus.RUNNING, 1)
    [logged] = decision.transitions
    assert logged.step == "s1" and "its delivery died" in (logged.reason or "")


def test_an_abandoned_compensation_is_sent_again() -> None:
    undoing = view(SagaState.COMPENSATING, [StepStatus.COMPENSATING, StepStatus.FAILED], 0, 3)
    decision = decide(undoing, Abandoned(0, 3, "died"), NOW)
    assert decision.commands == (RunCompensation(0, 3),)


@pytest.mark.parametrize(
    ("saga", "event"),
    [
        (
            view(SagaState.PENDING, [StepStatus.COMPLETED, StepStatus.RUNNING], 1, 2),
            Abandoned(1, 1, "x"),
        ),
        (
            view(SagaState.PENDING, [StepStatus.COMPLETED, StepStatus.RUNNING], 1, 2),
            Abandoned(0, 2, "x"),
        ),
        (
            view(SagaState.COMPLETED, [StepStatus.COMPLETED, StepStatus.COMPLETED], 1, 2),
            Abandoned(1, 2, "x"),
        ),
        (
            view(SagaState.COMPENSATING, [StepStatus.COMPENSATED, StepStatus.FAILED], 0, 3),
            Abandoned(0, 3, "x"),
        ),
    ],
    ids=["other-token", "other-step", "finished", "already-undone"],
)
def test_an_abandoned_event_the_saga_has_moved_past_changes_nothing(
    saga: SagaView, event: Abandoned
) -> None:
    decision = decide(saga, event, NOW)
    assert not decision.accepted and decision.commands == ()


# --- a redelivered message finds its own dead step -------------------------------------------

SAGA = saga_of(None, None)


def moved_to_step_1() -> tuple[InMemorySagaStore, str]:
    """A saga whose step 0 is done and step 1 begun by delivery ``outer`` (inline)."""
    store = InMemorySagaStore()
    coordinator = Coordinator(store, registry([SAGA]), clock=lambda: NOW)
    saga_id = coordinator.start("orders", {"id": 1}).saga_id
    first = StepRunner(SAGA, 0, "action", RetryPolicy(), lambda: NOW)
    message = StepMessage(saga_id, 0, 1, f"{saga_id}:s0:action")
    run = first.run(store, message, delivery="outer")
    coordinator.handle(saga_id, run.reply.event("action", 0, 1), run.to_record, run.snapshot)
    record = store.load(saga_id)
    key = f"{saga_id}:s1:action"
    store.begin_step(key, saga_id, NOW, _expect(record), "outer")
    return store, saga_id


def _expect(record: Any) -> Any:
    from celery_sagas.protocols import Expectation

    return Expectation(record.current_step, record.token, "action")


def test_a_redelivery_of_the_delivery_that_began_the_current_step_resends_it() -> None:
    store, saga_id = moved_to_step_1()
    record = store.load(saga_id)
    first = StepRunner(SAGA, 0, "action", RetryPolicy(), lambda: NOW)
    message = StepMessage(saga_id, 0, 1, f"{saga_id}:s0:action")
    run = first.run(store, message, delivery="outer")
    assert run == Resend(1, record.token, f"{saga_id}:s1:action", run.detail)
    assert "outer" in run.detail
    # another delivery (a replay, a forgery) of the same stale message runs nothing
    assert isinstance(first.run(store, message, delivery="someone-else"), Ignored)
    assert isinstance(first.run(store, message), Ignored)  # no delivery known


def test_abandoned_by_needs_a_started_marker_naming_the_delivery() -> None:
    store, saga_id = moved_to_step_1()
    record = store.load(saga_id)
    assert abandoned_by(SAGA, record, store.get_guard, "outer") is not None
    assert abandoned_by(SAGA, record, store.get_guard, "other") is None
    store.put_guard(GuardRecord(f"{saga_id}:s1:action", "ok", 1), NOW)  # it finished
    assert abandoned_by(SAGA, record, store.get_guard, "outer") is None
    assert abandoned_by(SAGA, record, lambda key: None, "outer") is None  # never begun


def test_which_steps_may_run_inline_is_the_steps_without_a_timeout() -> None:
    from celery_sagas.integration.inline import unlimited_steps

    assert unlimited_steps({"a": (None, 30.0, None), "b": (300.0,)}) == {"a": [0, 2], "b": []}


def test_install_says_where_timed_and_untimed_steps_run_inline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="celery_sagas"):
        app_with(saga_of(None, 300.0))
    said = [r.getMessage() for r in caplog.records if r.name == "celery_sagas"]
    assert any(
        "saga orders: steps with a timeout run inline in prefork workers only" in line
        and "without one ([0])" in line
        for line in said
    ), said


def test_a_worker_started_with_a_time_limit_runs_nothing_inline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``celery worker --time-limit`` applies to every delivery without showing in the
    app's config: ``worker_init`` notes it for the pool's children."""
    from celery_sagas.integration.inline import WORKER_LIMITED, note_worker_limits

    app = app_with(saga_of(None, None))
    inline = app._celery_sagas_runtime.inline
    monkeypatch.setenv(WORKER_LIMITED, "")  # restored (unset) after the test
    note_worker_limits(sender=SimpleNamespace(time_limit=None, soft_time_limit=None))
    assert inline.begin(app.tasks["orders.s0"], request()) is not None
    note_worker_limits(sender=SimpleNamespace(time_limit=None, soft_time_limit=60.0))
    assert inline.begin(app.tasks["orders.s0"], request()) is None


def test_a_router_that_routes_by_kwargs_is_asked_with_the_messages_kwargs() -> None:
    """A step another saga's kwargs would send elsewhere is published, not run here."""
    saga = saga_of(None, None)

    def by_saga(name: str, args: Any, kwargs: Any, options: Any, **_: Any) -> Any:
        if name == "orders.s1" and (kwargs or {}).get("saga_id") == "vip":
            return {"queue": "vip"}
        return None

    app = app_with(saga, task_routes=(by_saga,))
    inline = app._celery_sagas_runtime.inline
    assert inline.follow_up(step_message(saga, 1), on(inline, "celery")) is not None
    assert inline.follow_up(step_message(saga, 1, saga_id="vip"), on(inline, "celery")) is None
    assert inline.follow_up(step_message(saga, 1, saga_id="vip"), on(inline, "vip")) is not None
