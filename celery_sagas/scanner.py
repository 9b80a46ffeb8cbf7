"""The beat-driven scan: deadlines, lost messages, admissions and the stuck-saga alarm.

It never runs a step itself: it claims overdue sagas (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, serialised writers on SQLite) and feeds them a ``Tick`` through the same
coordinator transitions as any other event, so two beats running at once are harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from celery_sagas import machine
from celery_sagas.coordinator import Coordinator
from celery_sagas.log import logger
from celery_sagas.machine import StepStatus
from celery_sagas.protocols import Compacted, OutboxMessage, RetentionStore


@dataclass(frozen=True)
class ScanReport:
    messages: tuple[OutboxMessage, ...] = ()
    timed_out: int = 0
    resent: int = 0
    compensation_given_up: int = 0
    admitted: int = 0
    stuck: int = 0

    def __add__(self, other: ScanReport) -> ScanReport:
        return ScanReport(
            self.messages + other.messages,
            self.timed_out + other.timed_out,
            self.resent + other.resent,
            self.compensation_given_up + other.compensation_given_up,
            self.admitted + other.admitted,
            self.stuck + other.stuck,
        )


def classify(decision: machine.Decision) -> ScanReport:
    """What a Tick decision did, for counting (pure)."""
    new = [c.new for c in decision.step_changes]
    return ScanReport(
        timed_out=int(decision.timed_out),
        resent=int(any(c.old == c.new for c in decision.step_changes)),
        compensation_given_up=int(StepStatus.COMPENSATION_FAILED in new),
    )


def scan_due(coordinator: Coordinator, now: datetime, batch: int) -> ScanReport:
    """Act on every saga whose next deadline or re-send time has passed."""
    report = ScanReport()
    with coordinator.store.claim_due(now, batch) as claim:
        for record in claim.records:
            if not coordinator.knows(record):  # another version's saga: its workers scan it
                continue
            decision, written = coordinator.apply_claimed(claim, record, machine.Tick(), now)
            if decision.accepted:
                report += classify(decision) + ScanReport(messages=written)
    return report


def admit_waiting(coordinator: Coordinator) -> ScanReport:
    messages: tuple[OutboxMessage, ...] = ()
    for name in coordinator.store.waiting_names():
        if name in coordinator.sagas:
            messages += coordinator.admit(name)
    return ScanReport(messages=messages, admitted=len(messages))


def report_stuck(
    coordinator: Coordinator, now: datetime, stuck_after: float, batch: int
) -> ScanReport:
    """Warn once for each saga unfinished for longer than ``stuck_after`` seconds."""
    stuck = coordinator.store.report_stuck(now - timedelta(seconds=stuck_after), now, batch)
    for record in stuck:
        age = (now - record.created_at).total_seconds()
        logger.warning(
            "stuck saga %s (%s %s) is %s after %.0fs",
            record.saga_id,
            record.name,
            record.business_key,
            record.state.value,
            age,
            extra={"saga_id": record.saga_id, "saga": record.name, "reason": "stuck"},
        )
    return ScanReport(stuck=len(stuck))


def scan(coordinator: Coordinator, now: datetime, batch: int, stuck_after: float) -> ScanReport:
    report = (
        scan_due(coordinator, now, batch)
        + admit_waiting(coordinator)
        + report_stuck(coordinator, now, stuck_after, batch)
    )
    if report.timed_out or report.resent or report.compensation_given_up or report.admitted:
        logger.info(
            "scan: %d timed out, %d re-sent, %d compensation(s) given up, %d admitted",
            report.timed_out,
            report.resent,
            report.compensation_given_up,
            report.admitted,
        )
    return report


def compact(store: RetentionStore, now: datetime, after: float, batch: int) -> Compacted:
    """Delete the guards of sagas finished more than ``after`` seconds ago and the outbox
    rows sent that long ago: nothing reads them again (a message for a finished saga is
    ignored before its guard is read; sent rows are never read). One batched transaction
    per pass, off the step path; ``celery-sagas prune`` deletes the sagas themselves."""
    done = store.compact(now - timedelta(seconds=after), batch, now)
    if done.guards or done.outbox:
        logger.debug(
            "compacted %d finished saga(s): %d guard(s), %d sent outbox row(s) deleted",
            done.sagas,
            done.guards,
            done.outbox,
        )
    return done
