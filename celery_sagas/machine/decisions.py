"""What ``decide`` returns: the commands to dispatch, the step changes, the transition-log
entries and the dead-letter change, bundled in one ``Decision`` the coordinator stores in a
single transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery_sagas.machine.types import ErrorKind, SagaState, SagaView, StepStatus


@dataclass(frozen=True)
class RunStep:
    step: int
    token: int


@dataclass(frozen=True)
class RunCompensation:
    step: int
    token: int


@dataclass(frozen=True)
class SendToDeadLetterQueue:
    step: int


Command = RunStep | RunCompensation | SendToDeadLetterQueue


@dataclass(frozen=True)
class DeadLetterChange:
    """What happens to the dead-letter entry of ``step``: ``dead`` (create, or dead
    again), ``retrying``, ``resolved`` (only from retrying), ``discarded``.
    ``task_name`` and ``payload`` are filled in by the coordinator."""

    step: int
    status: str
    error: str | None = None
    traceback: str | None = None
    attempts: int | None = None
    resolution: str | None = None
    task_name: str | None = None
    payload: Any = None
    next_auto_retry_at: datetime | None = None


@dataclass(frozen=True)
class StepChange:
    index: int
    old: StepStatus
    new: StepStatus
    result: Any = None
    has_result: bool = False
    error: str | None = None
    error_kind: ErrorKind | None = None
    attempts: int | None = None  # forward or compensation attempts, by the new status
    deadline_at: datetime | None = None
    redispatch_at: datetime | None = None
    dispatches: int | None = None


@dataclass(frozen=True)
class Transition:
    step: str | None  # None: the saga itself
    old: str
    new: str
    reason: str | None = None


@dataclass(frozen=True)
class Decision:
    accepted: bool
    state: SagaState | None
    current_step: int
    token: int
    note: str = ""  # why an event was ignored
    reason: str | None = None  # failure reason to store, None = unchanged
    # the current step ran out of time (its own, its wait for a worker, or the saga's
    # deadline): timed out and compensated, or, never begun, skipped
    timed_out: bool = False
    step_changes: tuple[StepChange, ...] = ()
    transitions: tuple[Transition, ...] = ()
    commands: tuple[Command, ...] = ()
    admitted: bool = False  # step 0 was dispatched: the saga holds a concurrency slot
    due_at: datetime | None = None  # when the scanner must next look (accepted decisions)
    actor: str | None = None  # who caused it, for the transition log (None: the coordinator)
    dead_letter: DeadLetterChange | None = None


def ignore(saga: SagaView, note: str) -> Decision:
    return Decision(
        accepted=False,
        state=saga.state,
        current_step=saga.current_step,
        token=saga.token,
        note=note,
    )
