"""``celery_sagas.testing``: the in-memory store, the recording dispatcher and the driver."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from celery_sagas import dlq, outbox, scanner
from celery_sagas.coordinator import Coordinator, Timing
from celery_sagas.definition import Saga, Step, StepContext, registry
from celery_sagas.errors import BusinessError, SagaError, TransientError
from celery_sagas.machine import ErrorKind, SagaState, StepStatus
from celery_sagas.policy import RetryPolicy
from celery_sagas.protocols import STARTED, OutboxMessage
from celery_sagas.testing import InMemorySagaStore, RecordingDispatcher, run_until_settled

STEP_NAMES = ("reserve", "charge", "ship", "notify")


class Clock:
    """A clock that moves one second per reading, so every timestamp is distinct."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


class Toy:
    """Four toy participants that journal what they did; ``fail_at`` declines one step."""

    def __init__(self, fail_at: int | None = None, error: type[Exception] = BusinessError) -> None:
        self.fail_at = fail_at
        self.error = error
        self.journal: list[str] = []

    def action(self, index: int) -> Callable[[StepContext], Any]:
        def act(ctx: StepContext) -> Any:
            self.journal.append(f"do {ctx.step}")
            if index == self.fail_at:
                raise self.error(f"{ctx.step} declined")
            return {"step": ctx.step, "seen": sorted(ctx.results)}

        return act

    def compensation(self, index: int) -> Callable[[StepContext], Any]:
        def undo(ctx: StepContext) -> Any:
            if index != self.fail_at:  # a step that failed has no result to undo
                assert ctx.result == {"step": ctx.step, "seen": sorted(STEP_NAMES[:index])}
            self.journal.append(f"undo {ctx.step}")
            return None

        undo.__name__ = f"undo_{STEP_NAMES[index]}"
        return undo

    def saga(self) -> Saga:
        return Saga(
            "toy",
            [
                Step(
                    name,
                    self.action(i),
                    self.compensation(i),
                    compensation_retry=RetryPolicy(max_retries=0),
                )
                for i, name in enumerate(STEP_NAMES)
            ],
        )


def run(
    toy: Toy, dispatcher: RecordingDispatcher | None = None, **kwargs: Any
) -> tuple[InMemorySagaStore, Any]:
    store = InMemorySagaStore()
    dispatcher = dispatcher or RecordingDispatcher()
    coordinator = Coordinator(store, registry([toy.saga()]), clock=Clock())
    started = coordinator.start("toy", {"id": "order-1"})
    outbox.publish(store, dispatcher, started.messages, coordinator.clock)
    return store, run_until_settled(coordinator, store, dispatcher, started.saga_id, **kwargs)


def test_happy_path_completes_every_step_in_order() -> None:
    toy = Toy()
    store, final = run(toy)
    assert final.state == SagaState.COMPLETED
    assert toy.journal == [f"do {name}" for name in STEP_NAMES]
    assert [s.status for s in final.steps] == [StepStatus.COMPLETED] * 4
    assert final.results()["notify"] == {"step": "notify", "seen": sorted(STEP_NAMES[:3])}
    assert final.finished_at is not None
    assert store.row_counts() == {
        "saga": 1,
        "saga_step": 4,
        # saga -→STARTED→PENDING→COMPLETED, each step pending→running→completed
        "saga_transition": 3 + 2 * 4,
        "saga_outbox": 4,
        "saga_guard": 4,
        "saga_dead_letter": 0,
        "saga_attempt": 0,
    }
    assert store.unsent(datetime(2100, 1, 1, tzinfo=UTC), 100) == ()


@pytest.mark.parametrize("fail_at", range(4))
def test_business_failure_at_each_step_compensates_earlier_steps_in_reverse(fail_at: int) -> None:
    toy = Toy(fail_at=fail_at)
    _, final = run(toy)
    done = STEP_NAMES[:fail_at]
    assert final.state == SagaState.FAILED
    assert toy.journal == [f"do {n}" for n in (*done, STEP_NAMES[fail_at])] + [
        f"undo {n}" for n in reversed(done)
    ]
    assert [s.status for s in final.steps] == (
        [StepStatus.COMPENSATED] * fail_at
        + [StepStatus.FAILED]
        + [StepStatus.SKIPPED] * (3 - fail_at)
    )
    assert final.reason == f"{STEP_NAMES[fail_at]} failed: BusinessError: [business] " + (
        f"{STEP_NAMES[fail_at]} declined"
    )


@pytest.mark.parametrize("fail_at", range(4))
def test_unexpected_error_compensates_the_failed_step_too(fail_at: int) -> None:
    toy = Toy(fail_at=fail_at, error=RuntimeError)
    _, final = run(toy)
    assert final.state == SagaState.FAILED
    undone = [entry for entry in toy.journal if entry.startswith("undo")]
    assert undone == [f"undo {n}" for n in reversed(STEP_NAMES[: fail_at + 1])]


@pytest.mark.parametrize(
    ("fail_at", "commits"),
    [
        (None, 4),  # 4 step replies; start is a create, not a commit
        (0, 1),  # the failure only: nothing to compensate, FAILED at once
        (1, 3),  # 1 success + the failure + 1 compensation
        (2, 5),  # 2 successes + the failure + 2 compensations
        (3, 7),  # 3 successes + the failure + 3 compensations
    ],
)
def test_one_commit_per_transition(fail_at: int | None, commits: int) -> None:
    # Rule 2 of ARCHITECTURE.md: one transaction per transition. A 4-step saga takes one
    # `create` (start: STARTED + step 0 running + outbox) and then exactly one `write`
    # (coordinator.handle: decide on the step's snapshot, commit in one transaction) per reply: k
    # successes before the failing step, the failure, and one per compensation (k of them,
    # strictly in reverse). The happy path is 4 updates, and no separate `commit`.
    store, _ = run(Toy(fail_at=fail_at))
    assert store.calls.count("create") == 1
    assert store.calls.count("write") == commits
    assert store.calls.count("commit") == 0
    # Each delivery marks its guard started (reading the saga) once, and records the outcome
    # inside its write, never apart (every reply here is ok or business, both recorded).
    # publish still calls mark_sent after start and after each write, but with no ids:
    # step messages are marked sent by the saga's next transition, not by publish, and
    # none of these sagas has a dead letter.
    assert store.calls.count("begin_step") == commits
    assert store.calls.count("put_guard") == 0
    assert len(store._guards) == commits
    assert all(g.outcome != STARTED for g in store._guards.values())
    assert store.calls.count("mark_sent") == 1 + commits
    assert store.unsent(datetime(2100, 1, 1, tzinfo=UTC), 100) == ()


def test_the_exact_store_calls_of_a_happy_four_step_saga() -> None:
    store, _ = run(Toy())
    per_step = [
        "load",  # the driver: settled yet?
        # the step task: already done? if not, mark it started; and read the saga
        "begin_step",
        # coordinator.handle decides on that snapshot, then writes the guard's outcome,
        # state, step changes, transition log, earlier outbox rows marked sent and the next
        # outbox row in one transaction, gated on the version read (no load of its own)
        "write",
        # publish after write: step messages are no longer marked sent here (the next
        # transition does it), so mark_sent gets no ids (the SQL store then does nothing)
        "mark_sent",
    ]
    # 1 create + 1 mark_sent, then 4 calls per step, then the driver's final load:
    # 2 + 4 * 4 + 1 = 19 calls.
    assert store.calls == ["create", "mark_sent", *per_step * 4, "load"]
    assert len(store.calls) == 19


def test_publish_failures_are_relayed_and_the_saga_still_completes() -> None:
    dispatcher = RecordingDispatcher(fail_next=3)
    toy = Toy()
    store, final = run(toy, dispatcher)
    assert final.state == SagaState.COMPLETED
    assert toy.journal == [f"do {name}" for name in STEP_NAMES]  # each step ran once
    assert dispatcher.fail_next == 0
    assert len(dispatcher.sent) == 4
    assert "unsent" in store.calls


def test_a_redelivered_message_is_answered_from_the_guard() -> None:
    toy = Toy()
    store = InMemorySagaStore()
    dispatcher = RecordingDispatcher()
    coordinator = Coordinator(store, registry([toy.saga()]), clock=Clock())
    started = coordinator.start("toy", {"id": "order-1"})
    outbox.publish(store, dispatcher, started.messages, coordinator.clock)
    dispatcher.sent.append(dispatcher.sent[0])  # the broker delivered it twice
    final = run_until_settled(coordinator, store, dispatcher, started.saga_id)
    assert final.state == SagaState.COMPLETED
    assert toy.journal.count("do reserve") == 1


def test_participants_override_the_definition_by_task_name() -> None:
    def declined(ctx: StepContext) -> Any:
        raise BusinessError("no stock today")

    toy = Toy()
    _, final = run(toy, participants={"toy.ship": declined})
    assert final.state == SagaState.FAILED
    assert toy.journal == ["do reserve", "do charge", "undo charge", "undo reserve"]


def test_failing_compensation_is_retried_then_settles_compensation_failed() -> None:
    attempts: list[int] = []

    def flaky_undo(ctx: StepContext) -> Any:
        attempts.append(ctx.attempt)
        raise RuntimeError("refund service down")

    saga = Saga(
        "flaky",
        [
            Step("one", lambda ctx: 1, flaky_undo, compensation_retry=RetryPolicy(max_retries=2)),
            Step("two", lambda ctx: 2, lambda ctx: None, compensation_name="undo_two"),
        ],
    )
    store = InMemorySagaStore()
    dispatcher = RecordingDispatcher()
    coordinator = Coordinator(store, registry([saga]), clock=Clock())
    started = coordinator.start("flaky", {"id": "x"})
    overrides = {"flaky.two": Toy(fail_at=0).action(0)}
    final = run_until_settled(coordinator, store, dispatcher, started.saga_id, overrides)
    assert final.state == SagaState.COMPENSATION_FAILED
    assert attempts == [1, 2, 3]
    assert final.steps[0].status == StepStatus.COMPENSATION_FAILED
    assert final.steps[0].compensation_attempts == 3
    # No final outcome is recorded for it, so an operator's retry runs it again.
    key = f"{started.saga_id}:one:compensation"
    guard = store.get_guard(key)
    assert guard is not None and guard.outcome == STARTED
    # Every failed attempt is recorded, as the step task does.
    assert [(a.attempt, a.error) for a in store.attempts(key)] == [
        (n, "RuntimeError: refund service down") for n in (1, 2, 3)
    ]
    # It is in the dead-letter queue, and the message for the DLQ queue was published.
    (entry,) = store.dead_letters(status="open")
    assert (entry.status, entry.step, entry.step_name, entry.attempts) == ("dead", 0, "one", 3)
    assert entry.task_name == "flaky.flaky_undo"
    assert entry.error == "RuntimeError: refund service down"
    assert entry.traceback is not None and "RuntimeError" in entry.traceback
    assert dispatcher.sent[-1].body["kind"] == "dead_letter"


def test_transient_errors_are_retried_and_the_attempts_recorded() -> None:
    calls: list[int] = []

    def flaky_charge(ctx: StepContext) -> Any:
        calls.append(ctx.attempt)
        if ctx.attempt < 3:
            raise TransientError("gateway timeout")
        return "charged"

    toy = Toy()
    store, final = run(toy, participants={"toy.charge": flaky_charge})
    assert final.state == SagaState.COMPLETED
    assert calls == [1, 2, 3]
    assert [s.attempts for s in final.steps] == [1, 3, 1, 1]
    key = f"{final.saga_id}:charge:action"
    assert [a.attempt for a in store.attempts(key)] == [1, 2]  # the failed ones
    assert final.results()["charge"] == "charged"


def test_a_saga_with_nothing_to_deliver_is_reported_not_looped() -> None:
    store = InMemorySagaStore()
    coordinator = Coordinator(store, registry([Toy().saga()]), clock=Clock())
    started = coordinator.start("toy", {"id": "order-1"})
    outbox.publish(store, RecordingDispatcher(), started.messages, coordinator.clock)
    (message,) = started.messages
    # a worker took the message (its guard says started), then vanished: not relayed
    store.begin_guard(message.body["key"], coordinator.clock())
    with pytest.raises(SagaError, match="nothing to deliver"):
        run_until_settled(coordinator, store, RecordingDispatcher(), started.saga_id)


def test_a_published_step_message_no_worker_took_is_relayed() -> None:
    # publish does not mark a step message sent: until a worker takes it (its guard) or
    # the saga moves on, the relay publishes it again (marking it sent, relayed=True)
    toy = Toy()
    store = InMemorySagaStore()
    coordinator = Coordinator(store, registry([toy.saga()]), clock=Clock())
    started = coordinator.start("toy", {"id": "order-1"})
    outbox.publish(store, RecordingDispatcher(), started.messages, coordinator.clock)  # lost
    later = coordinator.clock() + timedelta(days=1)
    assert [m.id for m in store.unsent(later, 10)] == [m.id for m in started.messages]
    calls = len(store.calls)
    final = run_until_settled(coordinator, store, RecordingDispatcher(), started.saga_id)
    assert final.state == SagaState.COMPLETED
    assert toy.journal == [f"do {name}" for name in STEP_NAMES]
    assert store.calls[calls:].count("unsent") == 1  # relayed once, then marked sent
    assert store.unsent(later + timedelta(days=1), 10) == ()


def test_recording_dispatcher_fails_the_requested_number_of_sends() -> None:
    dispatcher = RecordingDispatcher(fail_next=1)
    message = OutboxMessage("s", {"kind": "action"}, id=1)
    with pytest.raises(ConnectionError):
        dispatcher.send(message)
    dispatcher.send(message)
    assert dispatcher.sent == [message]


def test_the_memory_store_refuses_naive_datetimes_like_the_sql_columns() -> None:
    store = InMemorySagaStore()
    with pytest.raises(ValueError, match="naive"):
        store.mark_sent([1], datetime(2030, 1, 1))  # noqa: DTZ001 - the point of the test
    assert store.calls == []


def test_scanner_claims_are_recorded_apart_from_commits() -> None:
    store = InMemorySagaStore()
    saga = Saga(
        "slow",
        [Step("one", lambda ctx: 1, lambda ctx: None, timeout=30, compensation_name="undo_one")],
    )
    clock = Clock()
    coordinator = Coordinator(
        store, registry([saga]), clock=clock, timing=Timing(max_redispatches=0)
    )
    started = coordinator.start("slow", {"id": "s-1"})
    store.begin_guard(f"{started.saga_id}:one:action", clock.now)  # a worker began it
    scanner.scan(coordinator, clock.now + timedelta(seconds=31), batch=10, stuck_after=3600)
    assert store.calls[store.calls.index("claim_due") + 1 :][:1] == ["claim.commit"]
    assert "commit" not in store.calls
    record = store.load(started.saga_id)
    assert record is not None and record.state == SagaState.COMPENSATING
    assert record.steps[0].status == StepStatus.COMPENSATING  # timed out: it may have acted
    assert record.steps[0].error_kind == ErrorKind.TIMEOUT


class Refunds:
    """A refund that fails its first ``failures`` attempts, journaling attempt numbers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: list[int] = []

    def refund(self, ctx: StepContext) -> Any:
        self.attempts.append(ctx.attempt)
        if len(self.attempts) <= self.failures:
            raise ConnectionError("refund API down")
        return "refunded"


def dying_saga(refunds: Refunds) -> Saga:
    def charge(ctx: StepContext) -> Any:
        return "charged"

    def ship(ctx: StepContext) -> Any:
        raise BusinessError("no stock")

    return Saga(
        "shop",
        [
            Step("charge", charge, refunds.refund, compensation_retry=RetryPolicy(max_retries=1)),
            Step("ship", ship, lambda ctx: None, compensation_name="unship"),
        ],
    )


def dead(refunds: Refunds) -> tuple[InMemorySagaStore, RecordingDispatcher, Coordinator, str]:
    """A saga whose refund died after 2 attempts: COMPENSATION_FAILED, one DLQ entry."""
    store, dispatcher = InMemorySagaStore(), RecordingDispatcher()
    coordinator = Coordinator(store, registry([dying_saga(refunds)]), clock=Clock())
    started = coordinator.start("shop", {"id": "o-1", "card_number": "4111"})
    outbox.publish(store, dispatcher, started.messages, coordinator.clock)
    final = run_until_settled(coordinator, store, dispatcher, started.saga_id)
    assert final.state == SagaState.COMPENSATION_FAILED
    return store, dispatcher, coordinator, started.saga_id


def test_an_operator_retry_runs_the_dead_compensation_again_and_resolves_it() -> None:
    refunds = Refunds(failures=2)
    store, dispatcher, coordinator, saga_id = dead(refunds)
    (entry,) = store.dead_letters()
    assert (entry.status, entry.task_name, entry.attempts) == ("dead", "shop.refund", 2)
    assert entry.payload == {"id": "o-1", "card_number": "***"}
    assert store.row_counts()["saga_dead_letter"] == 1
    assert store.row_counts()["saga_attempt"] == 2

    retried = dlq.retry(coordinator, entry.id, "alice", "the refund API is back")
    assert retried.changed
    assert store.dead_letters(status="open")[0].status == "retrying"
    outbox.publish(store, dispatcher, retried.messages, coordinator.clock)
    # The driver skips the dead-letter message and delivers only what is new: the
    # compensation, whose attempt numbers go on after the dead ones.
    final = run_until_settled(coordinator, store, dispatcher, saga_id)
    assert final.state == SagaState.FAILED
    assert final.steps[0].status == StepStatus.COMPENSATED
    assert final.steps[0].compensation_attempts == 3
    assert refunds.attempts == [1, 2, 3]
    (resolved,) = store.dead_letters()
    assert (resolved.status, resolved.resolution, resolved.deaths) == ("resolved", "compensated", 1)
    assert resolved.resolved_at is not None
    actors = {t.actor for t in store.transitions(saga_id)}
    assert actors == {"coordinator", "alice"}


def test_a_compensation_that_dies_again_makes_the_entry_dead_again() -> None:
    refunds = Refunds(failures=100)
    store, dispatcher, coordinator, saga_id = dead(refunds)
    (entry,) = store.dead_letters()
    retried = dlq.retry(coordinator, entry.id, "alice")
    outbox.publish(store, dispatcher, retried.messages, coordinator.clock)
    final = run_until_settled(coordinator, store, dispatcher, saga_id)
    assert final.state == SagaState.COMPENSATION_FAILED
    (again,) = store.dead_letters()
    assert (again.id, again.status, again.deaths) == (entry.id, "dead", 2)
    kinds = [m.body["kind"] for m in dispatcher.sent]
    assert kinds.count("dead_letter") == 2


def test_an_operator_discard_lets_the_saga_finish() -> None:
    store, _, coordinator, saga_id = dead(Refunds(failures=100))
    (entry,) = store.dead_letters()
    discarded = dlq.discard(coordinator, entry.id, "bob", "refunded in the PSP console")
    assert discarded.changed
    final = store.load(saga_id)
    assert final is not None and final.state == SagaState.FAILED
    assert store.dead_letters(status="open") == ()
    assert store.dead_letter(entry.id) == replace(
        entry,
        status="discarded",
        updated_at=final.updated_at,
        resolved_at=final.updated_at,
        resolution="compensated manually by bob: refunded in the PSP console",
    )


def test_the_driver_does_not_deliver_dead_letter_messages() -> None:
    store, dispatcher, coordinator, saga_id = dead(Refunds(failures=100))
    (entry,) = store.dead_letters()
    calls = len(store.calls)
    # settled: nothing is delivered, the dead letter included
    assert run_until_settled(coordinator, store, dispatcher, saga_id).state == (
        SagaState.COMPENSATION_FAILED
    )
    assert store.calls[calls:] == ["load"]
    # an unsettled saga with only a dead letter to deliver has nothing to deliver
    retried = dlq.retry(coordinator, entry.id, "alice")
    store.mark_sent([m.id for m in retried.messages if m.id], coordinator.clock())  # lost
    letter = OutboxMessage(saga_id, {"kind": "dead_letter", "saga_id": saga_id, "step": 0})
    dispatcher.sent.append(letter)
    with pytest.raises(SagaError, match="nothing to deliver"):
        run_until_settled(coordinator, store, dispatcher, saga_id)


def test_the_dead_letter_store_calls_are_recorded() -> None:
    store, _, coordinator, saga_id = dead(Refunds(failures=100))
    del store.calls[:]
    entry = store.dead_letter_for(saga_id, 0)
    assert entry is not None
    assert store.claim_auto_retry(entry, coordinator.clock())
    assert not store.claim_auto_retry(entry, coordinator.clock())
    store.dead_letter(entry.id)
    store.dead_letters()
    store.attempts("x")
    store.record_attempt(saga_id, "x", 1, "boom", coordinator.clock())
    assert store.calls == [
        "dead_letter_for",
        "claim_auto_retry",
        "claim_auto_retry",
        "dead_letter",
        "dead_letters",
        "attempts",
        "record_attempt",
    ]
    with pytest.raises(SagaError, match="unknown saga"):
        store.record_attempt("nope", "x", 1, "boom", coordinator.clock())
    assert store.row_counts()["saga_attempt"] == 3
