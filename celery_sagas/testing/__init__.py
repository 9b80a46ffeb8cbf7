"""Test doubles shipped with the library: run sagas in one process, without Celery or a database.

``InMemorySagaStore`` keeps the ``SagaStore`` contract of ``SqlSagaStore`` (the same contract
suite runs against both), dead-letter queue included, and records the calls it got in
``calls``. ``RecordingDispatcher`` keeps what was published in ``sent``.
``run_until_settled`` delivers those messages to the participants and feeds their outcomes
back to the coordinator until the saga settles::

    store, dispatcher = InMemorySagaStore(), RecordingDispatcher()
    coordinator = Coordinator(store, registry([order_saga]))
    started = coordinator.start("order", {"id": "A-1"})
    final = run_until_settled(coordinator, store, dispatcher, started.saga_id)
    assert final.state == SagaState.COMPLETED

For your own sagas, ``SagaHarness`` (a fake clock and scripted faults: ``FailStep``,
``Decline``, ``Hang``, ``CrashAfterEffect``, ``DeliverTwice``, ``FailCompensation``) and
``assert_compensates_at_every_step(saga, payload)`` (a failure injected at every step
index) run them through the step task's own runner; the pytest plugin
(``celery_sagas.testing.plugin``) adds the ``saga_harness`` and ``saga_clock`` fixtures.

A compensation that dies leaves the saga COMPENSATION_FAILED with an entry in
``store.dead_letters()``; ``celery_sagas.dlq.retry`` (publish its messages) and another
``run_until_settled`` re-run it.
"""

from celery_sagas.testing.driver import RecordingDispatcher, run_until_settled
from celery_sagas.testing.kit import (
    Call,
    CrashAfterEffect,
    Decline,
    DeliverTwice,
    FailCompensation,
    FailStep,
    FakeClock,
    Fault,
    Hang,
    InjectedDecline,
    InjectedFailure,
    SagaHarness,
    assert_compensates_at_every_step,
)
from celery_sagas.testing.scans import MemoryClaim
from celery_sagas.testing.store import InMemorySagaStore

__all__ = [
    "Call",
    "CrashAfterEffect",
    "Decline",
    "DeliverTwice",
    "FailCompensation",
    "FailStep",
    "FakeClock",
    "Fault",
    "Hang",
    "InMemorySagaStore",
    "InjectedDecline",
    "InjectedFailure",
    "MemoryClaim",
    "RecordingDispatcher",
    "SagaHarness",
    "assert_compensates_at_every_step",
    "run_until_settled",
]
