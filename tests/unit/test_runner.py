"""The one step path's pure rules (check, classify, scrub) and the runner on the in-memory
store: a message the saga does not expect runs nothing and writes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from celery_sagas import outbox, scanner
from celery_sagas.coordinator import Coordinator, Timing
from celery_sagas.definition import RetryPolicy, Saga, Step, StepContext, registry
from celery_sagas.errors import BusinessError, TransientError
from celery_sagas.machine import SagaState, StepStatus
from celery_sagas.redaction import scrub, secret_values
from celery_sagas.runner import (
    BAD_KEY,
    LATE,
    STALE,
    UNKNOWN_SAGA,
    Finished,
    Ignored,
    RetryLater,
    StepMessage,
    StepRunner,
    classify,
    is_connection_error,
    mismatch,
)
from celery_sagas.store.engine import build_engine
from celery_sagas.testing import InMemorySagaStore, RecordingDispatcher, run_until_settled

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CALLS: list[str] = []


def act(name: str) -> Any:
    def run(ctx: StepContext) -> str:
        CALLS.append(f"{name}:{ctx.saga_id}")
        return name

    return run


SAGA = Saga(
    "orders",
    [
        Step("reserve", act("reserve"), act("release"), compensation_name="release"),
        Step("pay", act("pay"), act("refund"), compensation_name="refund"),
    ],
)


class OperationalError(Exception):
    """What a database driver raises when its connection is gone (matched by name)."""


def step(**kwargs: Any) -> Step:
    return Step("s", lambda ctx: None, lambda ctx: None, compensation_name="undo", **kwargs)


@pytest.mark.parametrize(
    ("exc", "role", "kind"),
    [
        (BusinessError("no stock"), "action", "business"),
        (TransientError("busy"), "action", "retry"),
        (ConnectionError("reset"), "action", "reconnect"),
        (OperationalError("server closed the connection"), "action", "reconnect"),
        (TimeoutError("read"), "action", "reconnect"),
        (KeyError("boom"), "action", "error"),
        (KeyError("boom"), "compensation", "retry"),
        (BusinessError("odd"), "compensation", "retry"),
    ],
)
def test_classify(exc: Exception, role: str, kind: str) -> None:
    assert classify(step(), role, exc, ()) == kind


def test_connection_errors_can_be_declared_fatal_and_interruptions_are_timeouts() -> None:
    assert classify(step(retry_connection_errors=False), "action", ConnectionError(), ()) == "error"
    assert classify(step(), "action", ConnectionError(), (ConnectionError,)) == "timeout"
    assert is_connection_error(OperationalError()) and not is_connection_error(ValueError())


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (StepMessage("s1", 1, 2, "s1:pay:action"), None),
        (StepMessage("s1", 0, 2, "s1:pay:action"), BAD_KEY),
        (StepMessage("s1", 1, 2, "s2:pay:action"), BAD_KEY),
        (StepMessage("s1", 1, 2, "s1:pay:compensation"), BAD_KEY),
    ],
)
def test_a_message_must_name_its_tasks_step_and_the_key_the_saga_computes(
    message: StepMessage, reason: str | None
) -> None:
    refused = mismatch(SAGA, 1, "action", message)
    assert (refused.reason if refused else None) == reason


@pytest.fixture
def started() -> tuple[InMemorySagaStore, Coordinator, str]:
    store = InMemorySagaStore()
    coordinator = Coordinator(store, registry([SAGA]), clock=lambda: NOW)
    saga_id = coordinator.start("orders", {"id": "o-1", "card_number": "4111111111111111"}).saga_id
    CALLS.clear()
    return store, coordinator, saga_id


def runner(index: int, role: str, function: Any = None) -> StepRunner:
    return StepRunner(SAGA, index, role, RetryPolicy(max_retries=0), lambda: NOW, (), function)


@pytest.mark.parametrize(
    ("index", "role", "token", "saga", "reason"),
    [
        (0, "action", 1, "ghost", UNKNOWN_SAGA),
        (0, "action", 2, None, STALE),  # a token the saga never sent
        (1, "action", 1, None, STALE),  # a later step, before its turn
        (0, "compensation", 1, None, STALE),  # an undo of a live forward step
    ],
)
def test_an_unexpected_message_runs_nothing_and_writes_nothing(
    started: tuple[InMemorySagaStore, Coordinator, str],
    index: int,
    role: str,
    token: int,
    saga: str | None,
    reason: str,
) -> None:
    store, _, saga_id = started
    saga_id = saga or saga_id
    name = SAGA.steps[index].name
    message = StepMessage(saga_id, index, token, f"{saga_id}:{name}:{role}")
    run = runner(index, role).run(store, message)
    assert isinstance(run, Ignored) and run.reason == reason
    assert CALLS == []
    assert store.get_guard(message.key) is None  # no junk "started" marker


def test_a_step_that_timed_out_is_late_and_never_runs_afterwards(
    started: tuple[InMemorySagaStore, Coordinator, str],
) -> None:
    store, _, saga_id = started
    store.begin_guard(f"{saga_id}:reserve:action", NOW)  # a worker began it, then hung
    late = NOW + timedelta(seconds=301)  # past its 300 s timeout
    scanning = Coordinator(
        store, registry([SAGA]), clock=lambda: late, timing=Timing(max_redispatches=0)
    )
    scanner.scan(scanning, late, batch=10, stuck_after=36000)
    record = store.load(saga_id)
    assert record is not None and record.state == SagaState.COMPENSATING
    assert record.steps[0].status == StepStatus.COMPENSATING  # timed out, being undone
    run = runner(0, "action").run(store, StepMessage(saga_id, 0, 1, f"{saga_id}:reserve:action"))
    assert isinstance(run, Ignored) and run.reason == LATE
    assert CALLS == []


def test_the_expected_message_runs_once_and_a_retry_is_planned_by_the_policy(
    started: tuple[InMemorySagaStore, Coordinator, str],
) -> None:
    store, _, saga_id = started
    message = StepMessage(saga_id, 0, 1, f"{saga_id}:reserve:action")
    run = runner(0, "action").run(store, message)
    assert isinstance(run, Finished) and run.reply.outcome == "ok"
    assert run.reply.result == "reserve" and [f"reserve:{saga_id}"] == CALLS

    def lost(ctx: StepContext) -> None:
        raise ConnectionError("database went away")

    # no retries for its own errors: a lost connection still gets connection_retry's
    retrying = StepRunner(SAGA, 0, "action", RetryPolicy(max_retries=0), lambda: NOW, (), lost)
    assert isinstance(retrying.run(store, message), RetryLater)
    assert isinstance(retrying.run(store, message, tries=9), Finished)  # 8 retries, then no


def test_secrets_are_scrubbed_from_every_stored_error_text() -> None:
    card = "4111111111111111"

    def leaky(ctx: StepContext) -> None:
        raise RuntimeError(f"gateway refused card {ctx.payload['payment']['card_number']}")

    saga = Saga(
        "leaky",
        [Step("charge", leaky, lambda ctx: None, compensation_name="uncharge")],
    )
    store = InMemorySagaStore()
    coordinator = Coordinator(store, registry([saga]), clock=lambda: NOW)
    dispatcher = RecordingDispatcher()
    payload = {"id": "o-2", "payment": {"card_number": card}}
    started = coordinator.start("leaky", payload)
    outbox.publish(store, dispatcher, started.messages, lambda: NOW)
    record = run_until_settled(coordinator, store, dispatcher, started.saga_id)
    texts = [record.reason or "", *(s.error or "" for s in record.steps)]
    texts += [t.reason or "" for t in store.transitions(started.saga_id)]
    texts += [a.error for a in store.attempts(f"{started.saga_id}:charge:action")]
    assert any("gateway refused card ***" in t for t in texts)
    assert not any(card in t for t in texts)


def test_scrub_masks_nested_secret_values_longest_first() -> None:
    payload = {"a": {"address": "1 Main St, Springfield"}, "items": [{"cvv": "123"}], "x": "ok"}
    secrets = secret_values(payload, ("address", "cvv"))
    assert secrets == {"1 Main St, Springfield", "123"}
    assert scrub("ship to 1 Main St, Springfield (cvv 123) ok", secrets) == (
        "ship to *** (cvv ***) ok"
    )


def test_engines_hide_statement_parameters() -> None:
    assert build_engine("sqlite://").hide_parameters


def test_a_result_json_cannot_carry_fails_the_step_at_once_naming_it(
    started: tuple[InMemorySagaStore, Coordinator, str],
) -> None:
    store, _, saga_id = started
    message = StepMessage(saga_id, 0, 1, f"{saga_id}:reserve:action")
    run = runner(0, "action", lambda ctx: {"tags": {"a", "b"}}).run(store, message)
    assert isinstance(run, Finished) and run.reply.outcome == "error"
    assert "result of reserve is not JSON-serialisable" in (run.reply.error or "")
    when = datetime(2026, 5, 1, tzinfo=UTC)
    fresh, _, fresh_id = _start_one()
    ok = runner(0, "action", lambda ctx: {"at": when}).run(
        fresh, StepMessage(fresh_id, 0, 1, f"{fresh_id}:reserve:action")
    )
    assert isinstance(ok, Finished) and ok.reply.result == {"at": when.isoformat()}


def _start_one() -> tuple[InMemorySagaStore, Coordinator, str]:
    store = InMemorySagaStore()
    coordinator = Coordinator(store, registry([SAGA]), clock=lambda: NOW)
    return store, coordinator, coordinator.start("orders", {"id": "o-9"}).saga_id


def test_a_step_task_returns_the_reply_it_returned_before_step_reply_key_for_key(
    started: tuple[InMemorySagaStore, Coordinator, str],
) -> None:
    store, _, saga_id = started
    message = StepMessage(saga_id, 0, 1, f"{saga_id}:reserve:action")
    run = runner(0, "action").run(store, message)
    assert isinstance(run, Finished) and run.to_record is not None
    ran = {"outcome": "ok", "result": "reserve", "error": None, "attempts": 1}
    assert run.reply.to_json() == ran
    store.put_guard(run.to_record, NOW)  # what the coordinator writes with the outcome
    again = runner(0, "action").run(store, message)  # a duplicate delivery: the guard's record
    assert isinstance(again, Finished) and again.to_record is None
    assert again.reply.to_json() == {"outcome": "ok", "result": "reserve", "error": None}
