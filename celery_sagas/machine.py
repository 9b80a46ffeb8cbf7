"""The saga state machine: pure decisions, no I/O, no clock.

``decide(saga, event, now)`` returns a ``Decision``: the new saga state, the step status
changes, the transition-log entries and the commands to dispatch. The coordinator stores
all of it in one transaction; Celery only carries the commands out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any


class SagaState(StrEnum):
    STARTED = "STARTED"
    PENDING = "PENDING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    SKIPPED = "skipped"


class ErrorKind(StrEnum):
    BUSINESS = "business"  # the step declined and did not act: not compensated
    ERROR = "error"  # unknown outcome: compensated
    TIMEOUT = "timeout"


TERMINAL_STATES = frozenset({SagaState.COMPLETED, SagaState.FAILED})
SETTLED_STATES = TERMINAL_STATES | {SagaState.COMPENSATION_FAILED}
FORWARD_STATES = frozenset({SagaState.STARTED, SagaState.PENDING})


@dataclass(frozen=True)
class StepView:
    index: int
    name: str
    status: StepStatus
    error_kind: ErrorKind | None = None


@dataclass(frozen=True)
class SagaView:
    saga_id: str
    name: str
    state: SagaState | None  # None: not persisted yet
    current_step: int
    token: int
    steps: tuple[StepView, ...]


# --- events -------------------------------------------------------------------


@dataclass(frozen=True)
class Begin:
    """Start a freshly created saga."""


@dataclass(frozen=True)
class StepSucceeded:
    step: int
    token: int
    result: Any = None
    attempts: int | None = None  # how many times the action ran (retries + 1)


@dataclass(frozen=True)
class StepFailed:
    step: int
    token: int
    error: str
    business: bool
    attempts: int | None = None


@dataclass(frozen=True)
class CompensationSucceeded:
    step: int
    token: int
    result: Any = None
    attempts: int | None = None


@dataclass(frozen=True)
class CompensationFailed:
    step: int
    token: int
    error: str
    attempts: int | None = None


Event = Begin | StepSucceeded | StepFailed | CompensationSucceeded | CompensationFailed


# --- decisions ----------------------------------------------------------------


@dataclass(frozen=True)
class RunStep:
    step: int
    token: int


@dataclass(frozen=True)
class RunCompensation:
    step: int
    token: int


Command = RunStep | RunCompensation


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
    step_changes: tuple[StepChange, ...] = ()
    transitions: tuple[Transition, ...] = ()
    commands: tuple[Command, ...] = ()


def ignore(saga: SagaView, note: str) -> Decision:
    return Decision(
        accepted=False,
        state=saga.state,
        current_step=saga.current_step,
        token=saga.token,
        note=note,
    )


@dataclass
class _Draft:
    """Accumulates one decision; keeps step statuses current as changes are added."""

    saga: SagaView
    state: SagaState | None
    current_step: int
    token: int
    statuses: list[StepView]
    reason: str | None = None
    changes: list[StepChange] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)

    @classmethod
    def of(cls, saga: SagaView) -> _Draft:
        return cls(saga, saga.state, saga.current_step, saga.token, list(saga.steps))

    def step(self, index: int, new: StepStatus, **details: Any) -> None:
        old = self.statuses[index]
        kind = details.get("error_kind", old.error_kind)
        self.statuses[index] = replace(old, status=new, error_kind=kind)
        self.changes.append(StepChange(index, old.status, new, **details))
        reason = details.get("error")
        self.transitions.append(Transition(old.name, old.status.value, new.value, reason))

    def saga_state(self, new: SagaState, reason: str | None = None) -> None:
        old = self.state.value if self.state else "-"
        if self.state != new:
            self.transitions.append(Transition(None, old, new.value, reason))
        self.state = new

    def dispatch(self, command_type: type[RunStep] | type[RunCompensation], index: int) -> None:
        self.token += 1
        self.current_step = index
        self.commands.append(command_type(index, self.token))

    def done(self) -> Decision:
        return Decision(
            accepted=True,
            state=self.state,
            current_step=self.current_step,
            token=self.token,
            reason=self.reason,
            step_changes=tuple(self.changes),
            transitions=tuple(self.transitions),
            commands=tuple(self.commands),
        )


def needs_compensation(step: StepView) -> bool:
    """Completed or timed-out steps may have acted; so may a step that failed unexpectedly."""
    if step.status in (StepStatus.COMPLETED, StepStatus.TIMED_OUT):
        return True
    return step.status == StepStatus.FAILED and step.error_kind != ErrorKind.BUSINESS


def next_to_compensate(steps: Sequence[StepView], below: int) -> int | None:
    """The highest step index below ``below`` that still needs compensation."""
    for index in range(below - 1, -1, -1):
        if needs_compensation(steps[index]):
            return index
    return None


def _compensate_or_fail(draft: _Draft, below: int) -> None:
    target = next_to_compensate(draft.statuses, below)
    if target is None:
        draft.saga_state(SagaState.FAILED, draft.reason)
        return
    draft.saga_state(SagaState.COMPENSATING, draft.reason)
    draft.step(target, StepStatus.COMPENSATING)
    draft.dispatch(RunCompensation, target)


def _expects_reply(
    saga: SagaView, step: int, token: int, states: frozenset[SagaState], status: StepStatus
) -> str | None:
    """Why a reply is not for the saga's current attempt, or None if it is."""
    if saga.state not in states:
        return f"saga is {saga.state}"
    if step != saga.current_step:
        return f"step {step} is not the current step {saga.current_step}"
    if token != saga.token:
        return f"token {token} is not the current token {saga.token}"
    if saga.steps[step].status != status:
        late = saga.steps[step].status == StepStatus.TIMED_OUT
        return ("late: " if late else "") + f"step is {saga.steps[step].status}"
    return None


def _begin(saga: SagaView) -> Decision:
    if saga.state is not None:
        return ignore(saga, f"saga already {saga.state}")
    draft = _Draft.of(saga)
    draft.saga_state(SagaState.STARTED)
    draft.step(0, StepStatus.RUNNING)
    draft.dispatch(RunStep, 0)
    return draft.done()


def _step_succeeded(saga: SagaView, event: StepSucceeded) -> Decision:
    why = _expects_reply(saga, event.step, event.token, FORWARD_STATES, StepStatus.RUNNING)
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga)
    draft.step(
        event.step,
        StepStatus.COMPLETED,
        result=event.result,
        has_result=True,
        attempts=event.attempts,
    )
    following = event.step + 1
    if following == len(saga.steps):
        draft.saga_state(SagaState.COMPLETED)
    else:
        draft.saga_state(SagaState.PENDING)
        draft.step(following, StepStatus.RUNNING)
        draft.dispatch(RunStep, following)
    return draft.done()


def _step_failed(saga: SagaView, event: StepFailed) -> Decision:
    why = _expects_reply(saga, event.step, event.token, FORWARD_STATES, StepStatus.RUNNING)
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga)
    kind = ErrorKind.BUSINESS if event.business else ErrorKind.ERROR
    draft.step(
        event.step, StepStatus.FAILED, error=event.error, error_kind=kind, attempts=event.attempts
    )
    for later in range(event.step + 1, len(saga.steps)):
        draft.step(later, StepStatus.SKIPPED)
    draft.reason = f"{saga.steps[event.step].name} failed: {event.error}"
    _compensate_or_fail(draft, below=event.step + 1)
    return draft.done()


def _compensation_succeeded(saga: SagaView, event: CompensationSucceeded) -> Decision:
    why = _expects_reply(
        saga, event.step, event.token, frozenset({SagaState.COMPENSATING}), StepStatus.COMPENSATING
    )
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga)
    draft.step(event.step, StepStatus.COMPENSATED, attempts=event.attempts)
    _compensate_or_fail(draft, below=event.step)
    return draft.done()


def _compensation_failed(saga: SagaView, event: CompensationFailed) -> Decision:
    why = _expects_reply(
        saga, event.step, event.token, frozenset({SagaState.COMPENSATING}), StepStatus.COMPENSATING
    )
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga)
    draft.step(
        event.step, StepStatus.COMPENSATION_FAILED, error=event.error, attempts=event.attempts
    )
    draft.reason = f"compensation of {saga.steps[event.step].name} failed: {event.error}"
    draft.saga_state(SagaState.COMPENSATION_FAILED, draft.reason)
    return draft.done()


def decide(saga: SagaView, event: Event, now: datetime) -> Decision:
    """The one transition function. ``now`` is passed in, never read."""
    del now  # deadlines (scanner events) will use it; replies do not
    match event:
        case Begin():
            return _begin(saga)
        case StepSucceeded():
            return _step_succeeded(saga, event)
        case StepFailed():
            return _step_failed(saga, event)
        case CompensationSucceeded():
            return _compensation_succeeded(saga, event)
        case CompensationFailed():
            return _compensation_failed(saga, event)
    raise TypeError(f"unknown event {event!r}")
