"""The dead-letter queue's operations: retry, discard, cancel, and the recovery worker's
slow automatic retries. Each one is a coordinator transition (one transaction, logged
with who did it); publishing its messages is the caller's job."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from celery_sagas import machine
from celery_sagas.coordinator import Coordinator
from celery_sagas.errors import SagaError, SagaNotFoundError
from celery_sagas.log import logger
from celery_sagas.protocols import DeadLetterRecord, OutboxMessage

ALREADY = {
    "retrying": "is already being retried",
    "resolved": "is already resolved (its compensation succeeded)",
    "discarded": "was discarded (compensated by hand)",
}


@dataclass(frozen=True)
class ActionResult:
    """``changed`` is False for a no-op (already resolved, nothing to do)."""

    changed: bool
    message: str
    saga_id: str | None = None
    messages: tuple[OutboxMessage, ...] = ()


class DeadLetterNotFoundError(SagaNotFoundError):
    code = "dead_letter_not_found"


def entry_or_error(coordinator: Coordinator, entry_id: int) -> DeadLetterRecord:
    entry = coordinator.store.dead_letter(entry_id)
    if entry is None:
        raise DeadLetterNotFoundError(f"no dead-letter entry {entry_id}", entry_id=entry_id)
    return entry


def _apply(
    coordinator: Coordinator, entry: DeadLetterRecord, event: machine.Event, done: str
) -> ActionResult:
    if entry.status != "dead":
        return ActionResult(
            False, f"entry {entry.id} {ALREADY[entry.status]}; nothing done", entry.saga_id
        )
    outcome = coordinator.handle(entry.saga_id, event)
    decision = outcome.decision
    if decision is None or not decision.accepted:
        note = decision.note if decision else "saga not found"
        return ActionResult(False, f"entry {entry.id}: nothing done ({note})", entry.saga_id)
    return ActionResult(True, done, entry.saga_id, outcome.messages)


def retry(
    coordinator: Coordinator, entry_id: int, actor: str, reason: str | None = None
) -> ActionResult:
    """Re-run the dead compensation now; on success the saga carries on compensating."""
    entry = entry_or_error(coordinator, entry_id)
    event = machine.OperatorRetry(entry.step, actor, reason)
    done = f"entry {entry.id}: {entry.task_name} of saga {entry.saga_id} re-sent"
    return _apply(coordinator, entry, event, done)


def discard(coordinator: Coordinator, entry_id: int, actor: str, reason: str) -> ActionResult:
    """An operator undid the step by hand: mark it compensated and carry on."""
    if not reason.strip():
        raise SagaError("a reason is required to discard a dead letter")
    entry = entry_or_error(coordinator, entry_id)
    event = machine.OperatorDiscard(entry.step, actor, reason)
    done = f"entry {entry.id}: {entry.step_name} marked compensated by hand; saga carries on"
    return _apply(coordinator, entry, event, done)


def cancel(coordinator: Coordinator, ref: str, actor: str, reason: str) -> ActionResult:
    """Stop a running saga and compensate what it did, like a failure."""
    if not reason.strip():
        raise SagaError("a reason is required to cancel a saga")
    record = coordinator.store.find(ref)
    if record is None:
        raise SagaNotFoundError(f"no saga with id or business key {ref!r}")
    outcome = coordinator.handle(record.saga_id, machine.Cancel(actor, reason))
    decision = outcome.decision
    if decision is None or not decision.accepted:
        note = decision.note if decision else "saga not found"
        return ActionResult(False, f"saga {record.saga_id} not cancelled: {note}", record.saga_id)
    return ActionResult(
        True,
        f"saga {record.saga_id} cancelled; now {decision.state}",
        record.saga_id,
        outcome.messages,
    )


@dataclass(frozen=True)
class AutoRetryVerdict:
    action: str  # "done" | "wait" | "retry" | "give_up"
    wait: float | None = None


def auto_retry_verdict(
    entry: DeadLetterRecord | None, now: datetime, max_retries: int
) -> AutoRetryVerdict:
    """What the recovery worker does with a DLQ message (pure)."""
    if entry is None or entry.status != "dead":
        return AutoRetryVerdict("done")
    if entry.auto_retries >= max_retries:
        return AutoRetryVerdict("give_up")
    if entry.next_auto_retry_at is not None and now < entry.next_auto_retry_at:
        return AutoRetryVerdict("wait", (entry.next_auto_retry_at - now).total_seconds())
    return AutoRetryVerdict("retry")


def auto_retry(
    coordinator: Coordinator,
    saga_id: str,
    step: int,
    max_retries: int,
    interval: float,
) -> tuple[AutoRetryVerdict, ActionResult | None]:
    entry = coordinator.store.dead_letter_for(saga_id, step)
    now = coordinator.clock()
    verdict = auto_retry_verdict(entry, now, max_retries)
    if verdict.action == "give_up" and entry is not None:
        logger.critical(
            "saga %s: %s is dead for good after %d automatic retries; an operator must "
            "act: celery-sagas dlq show %d",
            saga_id,
            entry.task_name,
            entry.auto_retries,
            entry.id,
            extra={"saga_id": saga_id, "step": entry.step_name, "reason": "dlq_gave_up"},
        )
    if verdict.action != "retry" or entry is None:
        return verdict, None
    if not coordinator.store.claim_auto_retry(entry, now + timedelta(seconds=interval)):
        return AutoRetryVerdict("done"), None
    number = entry.auto_retries + 1
    result = retry(coordinator, entry.id, "dlq-recovery-worker", f"automatic retry {number}")
    return verdict, result
