"""``RecordingDispatcher`` and ``run_until_settled``: what Celery does, in one process."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from datetime import timedelta

from celery_sagas import outbox
from celery_sagas.coordinator import Coordinator
from celery_sagas.definition import Step, StepFunction
from celery_sagas.errors import SagaError, SagaNotFoundError
from celery_sagas.machine import SETTLED_STATES, Role
from celery_sagas.protocols import OutboxMessage, SagaRecord, SagaStore
from celery_sagas.runner import (
    Ignored,
    OtherDefinition,
    Resend,
    RetryLater,
    StepMessage,
    StepRunner,
    policy_for,
)

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


# what a test may put around a participant: (step, index, role, function) -> function
Wrap = Callable[[Step, int, Role, StepFunction], StepFunction]


def deliver_once(
    coordinator: Coordinator,
    store: SagaStore,
    dispatcher: RecordingDispatcher,
    message: OutboxMessage,
    wrap: Wrap | None = None,
    participants: Mapping[str, StepFunction] | None = None,
) -> None:
    """What the step task does with one message, through the same runner: check and mark
    the step started (reading the saga), run (retrying as its policy says, without
    waiting), then record the outcome and apply it in one transaction, publish."""
    body = message.body
    saga = coordinator.definition(body["saga"])
    index, role = int(body["step"]), Role(body["kind"])
    step = saga.steps[index]
    task = saga.step_task_name(index) if role == Role.ACTION else saga.compensation_task_name(index)
    function = (participants or {}).get(task) or (
        step.action if role == Role.ACTION else step.compensation
    )
    if wrap is not None:
        function = wrap(step, index, role, function)
    runner = StepRunner(
        saga,
        index,
        role,
        policy_for(saga, step, role, {}),
        coordinator.clock,
        function=function,
        redact_fields=coordinator.redact_fields,
    )
    message_in = StepMessage.of(body)
    tries = 1
    run = runner.run(store, message_in, tries)
    while isinstance(run, RetryLater):
        tries += 1
        run = runner.run(store, message_in, tries)
    # OtherDefinition: another process's saga; Resend needs a delivery (none given here)
    if isinstance(run, Ignored | OtherDefinition | Resend):
        return
    event = run.reply.event(role, index, body["token"])
    handled = coordinator.handle(body["saga_id"], event, run.to_record, run.snapshot)
    outbox.publish(store, dispatcher, handled.messages, coordinator.clock)


STEP_KINDS = tuple(Role)  # not a dead letter (the DLQ queue) nor a hook


def _for_a_step(message: OutboxMessage, saga_id: str) -> bool:
    """A message of the saga for a step task."""
    return message.saga_id == saga_id and message.body.get("kind") in STEP_KINDS


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

    Each message is run through the step task's own runner (check and ``begin_step``
    first, failed attempts recorded, outcome recorded, retries per the step's policy but
    without waiting),
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
        deliver_once(coordinator, store, dispatcher, sent[found], participants=overrides)
