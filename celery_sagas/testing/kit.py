"""A test kit for users' own sagas: one saga type in one process, a fake clock and scripted
faults, through the same step path the Celery task runs (``celery_sagas.runner``).

    harness = SagaHarness(order_saga, faults=[FailStep("charge", attempts=(1,))])
    record = harness.run({"id": "A-1"})
    assert record.state == SagaState.COMPLETED
    print(harness.timeline(record.saga_id))

Faults (each names a step by name or index): ``FailStep`` raises an unexpected error on the
given attempts (retried as the step's policy says, then compensated), ``Decline`` raises a
business error (not compensated), ``Hang`` never replies (the clock moves past its time and
the scanner times it out), ``CrashAfterEffect`` acts and then dies before its outcome is
recorded (the message is delivered again), ``DeliverTwice`` delivers its message twice,
``FailCompensation`` makes the compensation fail until it is dead-lettered
(``retry_dead_letters`` then runs it again, and it succeeds).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from celery_sagas import dlq, outbox, scanner
from celery_sagas.coordinator import Coordinator, Timing
from celery_sagas.definition import Saga, Step, StepContext, StepFunction, registry
from celery_sagas.errors import BusinessError, SagaError
from celery_sagas.machine import SETTLED_STATES, Role, SagaState
from celery_sagas.protocols import OutboxMessage, SagaRecord
from celery_sagas.testing.driver import STEP_KINDS, RecordingDispatcher, deliver_once
from celery_sagas.testing.store import InMemorySagaStore

START = datetime(2030, 1, 1, tzinfo=UTC)
MAX_DELIVERIES = 1000


class FakeClock:
    """A clock the test moves: ``clock()`` reads it, ``clock.advance(seconds)`` moves it."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


class InjectedFailure(RuntimeError):
    """What a ``FailStep`` or ``FailCompensation`` raises."""


class InjectedDecline(BusinessError):
    """What a ``Decline`` raises: the step declined and did not act."""


class _WorkerDied(BaseException):
    """A ``CrashAfterEffect``: the worker died after the participant acted."""


@dataclass(frozen=True)
class Fault:
    step: str | int

    def matches(self, saga: Saga, index: int) -> bool:
        return self.step == index or self.step == saga.steps[index].name


@dataclass(frozen=True)
class FailStep(Fault):
    """The action raises ``InjectedFailure`` on these attempts (all when empty)."""

    attempts: tuple[int, ...] = ()


@dataclass(frozen=True)
class Decline(Fault):
    """The action raises ``InjectedDecline`` (a business error)."""


@dataclass(frozen=True)
class Hang(Fault):
    """The action never replies: the clock moves past its time and the scan times it out."""


@dataclass(frozen=True)
class CrashAfterEffect(Fault):
    """The action acts, then its worker dies before the outcome is recorded (once)."""


@dataclass(frozen=True)
class DeliverTwice(Fault):
    """The action's message is delivered twice."""


@dataclass(frozen=True)
class FailCompensation(Fault):
    """The compensation fails until it is dead-lettered; a retry then succeeds."""


@dataclass(frozen=True)
class Call:
    """One call of a participant, as the harness saw it."""

    step: str
    role: Role
    key: str
    attempt: int
    result: Any = None
    raised: str | None = None  # the exception's class name, if it raised
    original: Any = None  # a compensation's ``ctx.result``: the action's result


@dataclass
class SagaHarness:
    """One saga type, an in-memory store, a fake clock and scripted faults."""

    saga: Saga
    faults: Sequence[Fault] = ()
    clock: FakeClock = field(default_factory=FakeClock)
    timing: Timing = field(default_factory=Timing)
    participants: Mapping[str, StepFunction] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store = InMemorySagaStore()
        self.dispatcher = RecordingDispatcher()
        self.coordinator = Coordinator(
            self.store, registry([self.saga]), clock=self.clock, timing=self.timing
        )
        self._crashed: set[str] = set()
        self._dead_letters_retried = False

    # -- what a test does -------------------------------------------------------------

    def start(self, payload: Mapping[str, Any]) -> str:
        started = self.coordinator.start(self.saga.name, payload)
        outbox.publish(self.store, self.dispatcher, started.messages, self.clock)
        return started.saga_id

    def run(self, payload: Mapping[str, Any]) -> SagaRecord:
        """Start a saga and deliver until it settles (hung steps are timed out by the
        scanner as the clock moves); returns the settled saga."""
        return self.settle(self.start(payload))

    def settle(self, saga_id: str) -> SagaRecord:
        for _ in range(MAX_DELIVERIES):
            record = self._load(saga_id)
            if record.state in SETTLED_STATES:
                return record
            message = self._next(saga_id)
            if message is None:
                self._let_time_pass(record)
                continue
            self._deliver(message)
        raise SagaError(f"saga {saga_id} did not settle in {MAX_DELIVERIES} deliveries")

    def scan(self) -> None:
        """What beat's scan does now (safe to call twice)."""
        report = scanner.scan(self.coordinator, self.clock(), batch=100, stuck_after=1e9)
        outbox.publish(self.store, self.dispatcher, report.messages, self.clock)

    def retry_dead_letters(self, saga_id: str) -> SagaRecord:
        """An operator's ``dlq retry`` of every dead entry of the saga, then settle."""
        self._dead_letters_retried = True
        for entry in self.store.dead_letters(saga_id=saga_id, status="dead"):
            result = dlq.retry(self.coordinator, entry.id, actor="test")
            outbox.publish(self.store, self.dispatcher, result.messages, self.clock)
        return self.settle(saga_id)

    def timeline(self, saga_id: str) -> str:
        """The saga's transition log and the participant calls, one line each."""
        lines = [
            f"{t.at:%H:%M:%S} {t.step or 'saga'}: {t.old} -> {t.new}"
            + (f" ({t.reason})" if t.reason else "")
            for t in self.store.transitions(saga_id)
        ]
        lines += [
            f"call {c.role} {c.step} attempt {c.attempt}"
            + (f" raised {c.raised}" if c.raised else "")
            for c in self.calls
            if c.key.startswith(f"{saga_id}:")
        ]
        return "\n".join(lines)

    # -- delivering ---------------------------------------------------------------------

    def _load(self, saga_id: str) -> SagaRecord:
        record = self.store.load(saga_id)
        if record is None:
            raise SagaError(f"saga {saga_id} not found")
        return record

    def _next(self, saga_id: str) -> OutboxMessage | None:
        sent, delivered = self.dispatcher.sent, self.dispatcher.delivered
        for index, message in enumerate(sent):
            if index in delivered or message.saga_id != saga_id:
                continue
            delivered.add(index)
            if message.body.get("kind") in STEP_KINDS:
                return message
        return None

    def _let_time_pass(self, record: SagaRecord) -> None:
        """Nothing to deliver: the saga waits for a hung step, or for the relay."""
        if record.state == SagaState.COMPENSATION_FAILED:
            raise SagaError(f"saga {record.saga_id} waits in the DLQ")
        later = self.clock() + timedelta(days=1)
        unsent = [
            m for m in self.store.unsent(later, MAX_DELIVERIES) if m.saga_id == record.saga_id
        ]
        if unsent:
            outbox.publish(self.store, self.dispatcher, unsent, self.clock, relayed=True)
            return
        step = record.steps[record.current_step]
        timeouts = self.timing.timeouts(self.saga)
        self.clock.advance((timeouts[step.index] or 300.0) + self.timing.time_limit_grace + 1)
        self.scan()

    def _deliver(self, message: OutboxMessage) -> None:
        body = message.body
        index, role = int(body["step"]), Role(body["kind"])
        if role == Role.ACTION and self._fault(Hang, index):
            key = str(body["key"])
            self.store.begin_guard(key, self.clock())  # a worker began it, and hangs
            return
        times = 2 if role == Role.ACTION and self._fault(DeliverTwice, index) else 1
        for _ in range(times):
            try:
                deliver_once(self.coordinator, self.store, self.dispatcher, message, self._wrap)
            except _WorkerDied:  # nothing recorded: the broker delivers it again
                deliver_once(self.coordinator, self.store, self.dispatcher, message, self._wrap)

    def _fault(self, kind: type[Fault], index: int) -> Fault | None:
        return next(
            (f for f in self.faults if isinstance(f, kind) and f.matches(self.saga, index)), None
        )

    def _wrap(self, step: Step, index: int, role: Role, function: StepFunction) -> StepFunction:
        """The participant as the test scripted it, journaling every call."""
        name = self.saga.step_task_name(index) if role == Role.ACTION else None
        name = name or self.saga.compensation_task_name(index)
        real = self.participants.get(name, function)

        def call(ctx: StepContext) -> Any:
            def journal(result: Any = None, raised: str | None = None) -> None:
                key, attempt = ctx.idempotency_key, ctx.attempt
                entry = Call(step.name, role, key, attempt, result, raised, ctx.result)
                self.calls.append(entry)

            try:
                self._misbehave_before(index, role, ctx)
                result = real(ctx)
            except Exception as exc:
                journal(raised=type(exc).__name__)
                raise
            journal(result)
            crash = role == Role.ACTION and self._fault(CrashAfterEffect, index)
            if crash and ctx.idempotency_key not in self._crashed:
                self._crashed.add(ctx.idempotency_key)
                raise _WorkerDied(ctx.idempotency_key)
            return result

        return call

    def _misbehave_before(self, index: int, role: Role, ctx: StepContext) -> None:
        if role == Role.ACTION:
            if self._fault(Decline, index):
                raise InjectedDecline(f"{ctx.step} declined (injected)")
            failing = self._fault(FailStep, index)
            if isinstance(failing, FailStep) and (
                not failing.attempts or ctx.attempt in failing.attempts
            ):
                raise InjectedFailure(f"{ctx.step} failed on attempt {ctx.attempt} (injected)")
        elif self._fault(FailCompensation, index) and not self._dead_letters_retried:
            raise InjectedFailure(f"compensation of {ctx.step} failed (injected)")


# -- the helper: a failure at every step index ------------------------------------------


def assert_compensates_at_every_step(
    saga: Saga,
    payload: Mapping[str, Any],
    participants: Mapping[str, StepFunction] | None = None,
    kinds: Iterable[str] = ("decline", "error"),
) -> list[SagaRecord]:
    """Run ``saga`` with a failure injected at every step index, once declining (a business
    error) and once failing unexpectedly, and assert what a saga promises: every run ends
    FAILED; compensations run in strict reverse order of the steps that acted, each with
    that step's original result; a step that declined is not compensated; each participant
    succeeds at most once per idempotency key. Returns the settled sagas."""
    settled = []
    for index in range(len(saga.steps)):
        for kind in kinds:
            fault: Fault = Decline(index) if kind == "decline" else FailStep(index)
            harness = SagaHarness(saga, faults=[fault], participants=participants or {})
            record = harness.run(payload)
            _check_run(harness, record, index, kind)
            settled.append(record)
    return settled


def _check_run(harness: SagaHarness, record: SagaRecord, index: int, kind: str) -> None:
    where = f"failure ({kind}) injected at step {index} ({harness.saga.steps[index].name})"
    timeline = harness.timeline(record.saga_id)

    def fail(problem: str) -> None:
        raise AssertionError(f"{where}: {problem}\ntimeline:\n{timeline}")

    if record.state != SagaState.FAILED:
        fail(f"the saga ended {record.state}, not FAILED")
    acted = [c for c in harness.calls if c.role == Role.ACTION and c.raised is None]
    done = Counter(c.key for c in acted)
    undone = Counter(c.key for c in harness.calls if c.role == Role.COMPENSATION and not c.raised)
    twice = [k for k, n in (done + undone).items() if n > 1]
    if twice:
        fail(f"participants succeeded more than once for {twice}")
    expected = [c.step for c in reversed(acted)]
    if kind == "error":  # the failed step may have acted: it is compensated first
        expected.insert(0, harness.saga.steps[index].name)
    compensations = [c for c in harness.calls if c.role == Role.COMPENSATION and not c.raised]
    if [c.step for c in compensations] != expected:
        fail(f"compensations ran {[c.step for c in compensations]}, expected {expected}")
    results = {c.step: c.result for c in acted}
    for c in compensations:
        if c.step in results and c.original != results[c.step]:
            fail(f"the compensation of {c.step} got {c.original!r}, not {results[c.step]!r}")
