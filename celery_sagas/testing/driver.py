"""``RecordingDispatcher`` and ``run_until_settled``: what Celery does, in one process."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta

from celery_sagas import outbox
from celery_sagas.coordinator import Coordinator
from celery_sagas.definition import Step, StepContext, StepFunction
from celery_sagas.errors import SagaError, SagaNotFoundError
from celery_sagas.machine import SETTLED_STATES, Event, outcome_event
from celery_sagas.policy import RetryAt, decide_retry
from celery_sagas.protocols import GuardRecord, OutboxMessage, SagaRecord, SagaStore

MAX_ERROR = 2000  # as the step task (celery_sagas.integration.steps)
MAX_TRACEBACK = 8000
DEAD_LETTER = "dead_letter"  # the body kind of a message for the DLQ queue, not a step


class RecordingDispatcher:
    """A ``Dispatcher`` that keeps what it was asked to publish in ``sent``.

    ``fail_next=n`` makes the next ``n`` sends raise ``ConnectionError`` (a broker outage):
    those messages stay unsent in the outbox, for the relay. ``delivered`` holds the
    indices in ``sent`` that ``run_until_settled`` has delivered: like a broker, it
    delivers each publish once, across calls.
    """

    def __init__(self, fail_next: int = 0) -> None:
        self.sent: list[OutboxMessage] = []
        self.delivered: set[int] = set()
        self.fail_next = fail_next
        self._lock = threading.Lock()

    def send(self, message: OutboxMessage) -> None:
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                raise ConnectionError(f"simulated publish failure of outbox {message.id}")
            self.sent.append(message)


@dataclass(frozen=True)
class _Delivery:
    message: OutboxMessage
    step: Step
    role: str  # "action" | "compensation"
    function: StepFunction


@dataclass(frozen=True)
class _Ran:
    """What running a participant gave: the outcome, the number of the last attempt (it
    continues an earlier count after an operator retry) and, for an error, its traceback."""

    outcome: GuardRecord
    attempts: int | None
    traceback: str | None = None


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR] + "…"


def _run(
    coordinator: Coordinator, store: SagaStore, delivery: _Delivery, context: StepContext
) -> _Ran:
    """Call the participant, retrying as its policy says (without waiting). Like the step
    task, every failed attempt but a business decline is recorded (``record_attempt``)."""
    step, key = delivery.step, context.idempotency_key
    retries = 0  # this delivery's retries: what the retry policy counts
    while True:
        try:
            return _Ran(GuardRecord(key, "ok", delivery.function(context)), context.attempt)
        except Exception as exc:
            if delivery.role == "action" and isinstance(exc, tuple(step.business_errors)):
                declined = GuardRecord(key, "business", error=_describe(exc))
                return _Ran(declined, context.attempt)
            store.record_attempt(
                context.saga_id, key, context.attempt, _describe(exc), coordinator.clock()
            )
            if delivery.role == "action":
                policy, retryable = step.retry, isinstance(exc, tuple(step.retry_on))
            else:
                policy, retryable = step.compensation_retry, True
            if not isinstance(
                decide_retry(policy, retries + 1, retryable, coordinator.clock()), RetryAt
            ):
                trace = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK:]
                failed = GuardRecord(key, "error", error=_describe(exc))
                return _Ran(failed, context.attempt, trace)
            retries += 1
            context = replace(context, attempt=context.attempt + 1)


def _event(delivery: _Delivery, ran: _Ran) -> Event:
    body, outcome = delivery.message.body, ran.outcome
    return outcome_event(
        delivery.role,
        body["step"],
        body["token"],
        {
            "outcome": outcome.outcome,
            "result": outcome.result,
            "error": outcome.error,
            "attempts": ran.attempts,
            "traceback": ran.traceback,
        },
    )


def _deliver(
    coordinator: Coordinator,
    store: SagaStore,
    dispatcher: RecordingDispatcher,
    delivery: _Delivery,
) -> None:
    """What the step task does: mark the guard started (reading the saga), run, then
    record the outcome and apply it in one transaction, publish."""
    body = delivery.message.body
    recorded, snapshot = store.begin_step(body["key"], body["saga_id"], coordinator.clock())
    to_record = None
    if recorded is not None:  # a duplicate delivery: the recorded outcome, attempts unknown
        ran = _Ran(recorded, None)
    else:
        context = StepContext(
            saga_id=body["saga_id"],
            saga=body["saga"],
            step=delivery.step.name,
            payload=body["payload"],
            results=body.get("results", {}),
            idempotency_key=body["key"],
            attempt=body.get("attempts_before", 0) + 1,
            result=body.get("result"),
        )
        ran = _run(coordinator, store, delivery, context)
        if not (ran.outcome.outcome == "error" and delivery.role == "compensation"):
            # As the real task: a failed compensation is not recorded (it may be retried).
            to_record = ran.outcome
    event = _event(delivery, ran)
    handled = coordinator.handle(body["saga_id"], event, to_record, snapshot)
    outbox.publish(store, dispatcher, handled.messages, coordinator.clock)


def _delivery(
    coordinator: Coordinator, message: OutboxMessage, participants: Mapping[str, StepFunction]
) -> _Delivery:
    body = message.body
    saga = coordinator.definition(body["saga"])
    index = body["step"]
    step = saga.steps[index]
    if body["kind"] == "action":
        task, function = saga.step_task_name(index), step.action
    else:
        task, function = saga.compensation_task_name(index), step.compensation
    return _Delivery(message, step, body["kind"], participants.get(task, function))


def _for_a_step(message: OutboxMessage, saga_id: str) -> bool:
    """A message of the saga for a step task (not a dead letter, for the DLQ queue)."""
    return message.saga_id == saga_id and message.body.get("kind") != DEAD_LETTER


def run_until_settled(
    coordinator: Coordinator,
    store: SagaStore,
    dispatcher: RecordingDispatcher,
    saga_id: str,
    participants: Mapping[str, StepFunction] | None = None,
    *,
    max_deliveries: int = 1000,
) -> SagaRecord:
    """Deliver the saga's published messages, in order, until it settles; returns it.

    Each message in ``dispatcher.sent`` is delivered once, even over several calls (so a
    call after an operator's retry delivers only what was published since).

    Each message is run like the Celery step task would (``begin_guard`` first, failed
    attempts recorded, outcome recorded, retries per the step's policy but without waiting),
    its outcome becomes the machine event handed to ``coordinator.handle``, and the new
    outbox messages are published to ``dispatcher``. Messages left unsent (``fail_next``)
    are relayed. Dead-letter messages (body kind ``"dead_letter"``, for the recovery
    worker's DLQ queue) stay in ``dispatcher.sent`` and are not delivered: act on the entry
    with ``celery_sagas.dlq`` and call this again.
    ``participants`` overrides the definition's functions by task name, e.g.
    ``{"order.charge": fake_charge, "order.refund": fake_refund}``.
    """
    overrides = participants or {}
    budget = max_deliveries
    while True:
        record = store.load(saga_id)
        if record is None:
            raise SagaNotFoundError(f"saga {saga_id} not found", saga_id=saga_id)
        if record.state in SETTLED_STATES:
            return record
        budget -= 1
        if budget < 0:
            raise SagaError(f"saga {saga_id} did not settle in {max_deliveries} deliveries")
        sent, delivered = dispatcher.sent, dispatcher.delivered
        found = next(
            (i for i in range(len(sent)) if i not in delivered and _for_a_step(sent[i], saga_id)),
            None,
        )
        if found is None:
            # What the beat relay does: republish the rows left unsent after a failed publish.
            later = coordinator.clock() + timedelta(days=1)
            unsent = [m for m in store.unsent(later, max_deliveries) if m.saga_id == saga_id]
            if not any(_for_a_step(m, saga_id) for m in unsent):
                raise SagaError(f"saga {saga_id} is {record.state} but has nothing to deliver")
            outbox.publish(store, dispatcher, unsent, coordinator.clock, relayed=True)
            continue
        delivered.add(found)
        _deliver(coordinator, store, dispatcher, _delivery(coordinator, sent[found], overrides))
