"""The saga state machine: pure decisions, no I/O, no clock.

``decide(saga, event, now)`` returns a ``Decision``: the new saga state, the step status
changes, the transition-log entries and the commands to dispatch. The coordinator stores
all of it in one transaction; Celery only carries the commands out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
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
LIVE_STATES = FORWARD_STATES | {SagaState.COMPENSATING}


@dataclass(frozen=True)
class StepView:
    index: int
    name: str
    status: StepStatus
    error_kind: ErrorKind | None = None
    timeout: float | None = None  # seconds one attempt may take (from definition/config)
    deadline_at: datetime | None = None  # while running: when it times out
    redispatch_at: datetime | None = None  # when to re-send if no reply came (lost message)
    dispatches: int = 0  # sends of the current run or compensation, re-sends included
    started: bool = False  # a worker began executing it: the message was not lost


@dataclass(frozen=True)
class SagaView:
    saga_id: str
    name: str
    state: SagaState | None  # None: not persisted yet
    current_step: int
    token: int
    steps: tuple[StepView, ...]
    deadline_at: datetime | None = None  # the saga-wide deadline
    max_redispatches: int = 2  # re-sends of a silent step before it counts as timed out


# --- events -------------------------------------------------------------------


@dataclass(frozen=True)
class Begin:
    """Create a saga; ``admit=False`` leaves it waiting in STARTED (``max_concurrent``)."""

    admit: bool = True


@dataclass(frozen=True)
class Admit:
    """A slot freed up: start a saga that was waiting in STARTED."""


@dataclass(frozen=True)
class Tick:
    """The scanner looked at the saga: act on whatever deadline ``now`` has passed."""


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
    traceback: str | None = None


@dataclass(frozen=True)
class OperatorRetry:
    """An operator (or the DLQ recovery worker) re-runs a dead compensation."""

    step: int
    actor: str
    reason: str | None = None


@dataclass(frozen=True)
class OperatorDiscard:
    """An operator undid the step by hand: count it compensated and carry on."""

    step: int
    actor: str
    reason: str


@dataclass(frozen=True)
class Cancel:
    """Stop a running saga and compensate what it did, like a failure."""

    actor: str
    reason: str


Event = (
    Begin
    | Admit
    | Tick
    | StepSucceeded
    | StepFailed
    | CompensationSucceeded
    | CompensationFailed
    | OperatorRetry
    | OperatorDiscard
    | Cancel
)


# --- decisions ----------------------------------------------------------------


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


@dataclass
class _Draft:
    """Accumulates one decision; keeps step statuses current as changes are added."""

    saga: SagaView
    now: datetime
    state: SagaState | None
    current_step: int
    token: int
    statuses: list[StepView]
    reason: str | None = None
    actor: str | None = None
    dead_letter: DeadLetterChange | None = None
    changes: list[StepChange] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)

    @classmethod
    def of(cls, saga: SagaView, now: datetime) -> _Draft:
        return cls(saga, now, saga.state, saga.current_step, saga.token, list(saga.steps))

    def step(self, index: int, new: StepStatus, reason: str | None = None, **details: Any) -> None:
        old = self.statuses[index]
        kept: dict[str, Any] = {
            k: details[k] for k in ("error_kind", "deadline_at", "redispatch_at") if k in details
        }
        if new not in (StepStatus.RUNNING, StepStatus.COMPENSATING):
            kept.update(deadline_at=None, redispatch_at=None)
        self.statuses[index] = replace(old, status=new, **kept)
        self.changes.append(StepChange(index, old.status, new, **details))
        why = reason or details.get("error")
        self.transitions.append(Transition(old.name, old.status.value, new.value, why))

    def timing(self, index: int, dispatches: int, forward: bool) -> dict[str, Any]:
        """Deadline and re-send time of a step sent now for the ``dispatches``-th time."""
        timeout = self.statuses[index].timeout
        if timeout is None:
            return {"dispatches": dispatches}
        interval = timedelta(seconds=timeout / (self.saga.max_redispatches + 1))
        last_send = forward and dispatches > self.saga.max_redispatches
        return {
            "deadline_at": self.now + timedelta(seconds=timeout) if forward else None,
            "redispatch_at": None if last_send else self.now + interval,
            "dispatches": dispatches,
        }

    def due_at(self) -> datetime | None:
        """When the scanner must next look at this saga (None: nothing to watch)."""
        if self.state not in FORWARD_STATES | {SagaState.COMPENSATING}:
            return None
        current = self.statuses[self.current_step]
        resend_at = None if current.started else current.redispatch_at
        moments = [current.deadline_at, resend_at]
        if self.state in FORWARD_STATES:
            moments.append(self.saga.deadline_at)
        return min((m for m in moments if m is not None), default=None)

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
            due_at=self.due_at(),
            actor=self.actor,
            dead_letter=self.dead_letter,
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
    draft.step(target, StepStatus.COMPENSATING, **draft.timing(target, 1, forward=False))
    draft.dispatch(RunCompensation, target)


def _timed_out(step: StepView) -> bool:
    return step.status == StepStatus.TIMED_OUT or step.error_kind == ErrorKind.TIMEOUT


def _expects_reply(
    saga: SagaView, step: int, token: int, states: frozenset[SagaState], status: StepStatus
) -> str | None:
    """Why a reply is not for the saga's current attempt, or None if it is."""
    forward_reply = status == StepStatus.RUNNING
    if forward_reply and 0 <= step < len(saga.steps) and _timed_out(saga.steps[step]):
        return f"late: {saga.steps[step].name} already timed out"
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


def _run_first_step(draft: _Draft) -> Decision:
    draft.step(0, StepStatus.RUNNING, **draft.timing(0, 1, forward=True))
    draft.dispatch(RunStep, 0)
    return replace(draft.done(), admitted=True)


def _begin(saga: SagaView, event: Begin, now: datetime) -> Decision:
    if saga.state is not None:
        return ignore(saga, f"saga already {saga.state}")
    draft = _Draft.of(saga, now)
    draft.saga_state(SagaState.STARTED, None if event.admit else "waiting for a free slot")
    return _run_first_step(draft) if event.admit else draft.done()


def _admit(saga: SagaView, now: datetime) -> Decision:
    if saga.state != SagaState.STARTED or saga.steps[0].status != StepStatus.PENDING:
        return ignore(saga, "not waiting for admission")
    return _run_first_step(_Draft.of(saga, now))


def _step_succeeded(saga: SagaView, event: StepSucceeded, now: datetime) -> Decision:
    why = _expects_reply(saga, event.step, event.token, FORWARD_STATES, StepStatus.RUNNING)
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga, now)
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
        draft.step(following, StepStatus.RUNNING, **draft.timing(following, 1, forward=True))
        draft.dispatch(RunStep, following)
    return draft.done()


def _step_failed(saga: SagaView, event: StepFailed, now: datetime) -> Decision:
    why = _expects_reply(saga, event.step, event.token, FORWARD_STATES, StepStatus.RUNNING)
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga, now)
    kind = ErrorKind.BUSINESS if event.business else ErrorKind.ERROR
    draft.step(
        event.step, StepStatus.FAILED, error=event.error, error_kind=kind, attempts=event.attempts
    )
    _skip_later_steps(draft, event.step)
    draft.reason = f"{saga.steps[event.step].name} failed: {event.error}"
    _compensate_or_fail(draft, below=event.step + 1)
    return draft.done()


def _compensation_succeeded(
    saga: SagaView, event: CompensationSucceeded, now: datetime
) -> Decision:
    why = _expects_reply(
        saga, event.step, event.token, frozenset({SagaState.COMPENSATING}), StepStatus.COMPENSATING
    )
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga, now)
    draft.step(event.step, StepStatus.COMPENSATED, attempts=event.attempts)
    # a no-op unless this compensation was re-run from the dead-letter queue
    draft.dead_letter = DeadLetterChange(event.step, "resolved", resolution="compensated")
    _compensate_or_fail(draft, below=event.step)
    return draft.done()


def _compensation_failed(saga: SagaView, event: CompensationFailed, now: datetime) -> Decision:
    why = _expects_reply(
        saga, event.step, event.token, frozenset({SagaState.COMPENSATING}), StepStatus.COMPENSATING
    )
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga, now)
    draft.step(
        event.step, StepStatus.COMPENSATION_FAILED, error=event.error, attempts=event.attempts
    )
    draft.reason = f"compensation of {saga.steps[event.step].name} failed: {event.error}"
    draft.saga_state(SagaState.COMPENSATION_FAILED, draft.reason)
    draft.dead_letter = DeadLetterChange(
        event.step, "dead", event.error, event.traceback, event.attempts
    )
    draft.commands.append(SendToDeadLetterQueue(event.step))
    return draft.done()


def _dead_step(saga: SagaView, step: int) -> str | None:
    """Why an operator action on ``step`` does not apply, or None if it does."""
    if saga.state != SagaState.COMPENSATION_FAILED:
        return f"saga is {saga.state}, not COMPENSATION_FAILED"
    if step != saga.current_step or saga.steps[step].status != StepStatus.COMPENSATION_FAILED:
        return f"the compensation of step {step} is not the dead one"
    return None


def _operator_retry(saga: SagaView, event: OperatorRetry, now: datetime) -> Decision:
    why = _dead_step(saga, event.step)
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga, now)
    draft.actor = event.actor
    said = f"retry by {event.actor}" + (f": {event.reason}" if event.reason else "")
    draft.saga_state(SagaState.COMPENSATING, said)
    timing = draft.timing(event.step, 1, forward=False)
    draft.step(event.step, StepStatus.COMPENSATING, reason=said, **timing)
    draft.dispatch(RunCompensation, event.step)
    draft.dead_letter = DeadLetterChange(event.step, "retrying", resolution=said)
    return draft.done()


def _operator_discard(saga: SagaView, event: OperatorDiscard, now: datetime) -> Decision:
    why = _dead_step(saga, event.step)
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga, now)
    draft.actor = event.actor
    said = f"compensated manually by {event.actor}: {event.reason}"
    draft.step(event.step, StepStatus.COMPENSATED, reason=said)
    draft.dead_letter = DeadLetterChange(event.step, "discarded", resolution=said)
    _compensate_or_fail(draft, below=event.step)
    return draft.done()


def _cancel(saga: SagaView, event: Cancel, now: datetime) -> Decision:
    if saga.state not in FORWARD_STATES:
        return ignore(saga, f"saga is {saga.state}: only a running saga can be cancelled")
    draft = _Draft.of(saga, now)
    draft.actor = event.actor
    said = f"cancelled by {event.actor}: {event.reason}"
    index = saga.current_step
    if saga.steps[index].status == StepStatus.RUNNING:  # it may have acted: compensate it
        draft.step(index, StepStatus.FAILED, error=said, error_kind=ErrorKind.ERROR)
    else:
        draft.step(index, StepStatus.SKIPPED, reason=said)
    _skip_later_steps(draft, index)
    draft.reason = said
    _compensate_or_fail(draft, below=index + 1)
    return draft.done()


def _skip_later_steps(draft: _Draft, index: int) -> None:
    for later in range(index + 1, len(draft.saga.steps)):
        if draft.statuses[later].status == StepStatus.PENDING:
            draft.step(later, StepStatus.SKIPPED)


def _time_out(saga: SagaView, now: datetime, why: str) -> Decision:
    """The current step took too long: it may still have acted, so it is compensated too."""
    draft = _Draft.of(saga, now)
    index = saga.current_step
    current = saga.steps[index]
    if current.status == StepStatus.RUNNING:
        draft.step(index, StepStatus.TIMED_OUT, error=why, error_kind=ErrorKind.TIMEOUT)
    else:  # waiting for admission: nothing ran
        draft.step(index, StepStatus.SKIPPED, reason=why)
    _skip_later_steps(draft, index)
    draft.reason = f"{current.name} timed out: {why}"
    _compensate_or_fail(draft, below=index + 1)
    return draft.done()


def _resend(saga: SagaView, now: datetime) -> Decision:
    """No reply yet: re-send the current message (same token; the guard dedupes)."""
    draft = _Draft.of(saga, now)
    index = saga.current_step
    current = saga.steps[index]
    forward = current.status == StepStatus.RUNNING
    timing = draft.timing(index, current.dispatches + 1, forward)
    timing.pop("deadline_at", None)  # a re-send does not extend the deadline
    draft.step(index, current.status, reason=f"re-sent (send {current.dispatches + 1})", **timing)
    draft.commands.append((RunStep if forward else RunCompensation)(index, saga.token))
    return draft.done()


def _due(moment: datetime | None, now: datetime) -> bool:
    return moment is not None and now >= moment


def _watch_deadline_only(saga: SagaView, now: datetime) -> Decision:
    """A worker is on it: no re-send; only the deadline is left to watch (no log row)."""
    return _Draft.of(saga, now).done()


def _resend_due(saga: SagaView, current: StepView, now: datetime) -> bool:
    """Re-send only a message no worker has started on (lost with the broker), and only
    ``max_redispatches`` times."""
    return (
        not current.started
        and _due(current.redispatch_at, now)
        and current.dispatches <= saga.max_redispatches
    )


def _tick(saga: SagaView, now: datetime) -> Decision:
    if saga.state not in FORWARD_STATES | {SagaState.COMPENSATING}:
        return ignore(saga, f"saga is {saga.state}")
    current = saga.steps[saga.current_step]
    if saga.state in FORWARD_STATES:
        if _due(saga.deadline_at, now):
            return _time_out(saga, now, "saga deadline passed")
        if current.status != StepStatus.RUNNING:
            return ignore(saga, "nothing due")
        if _due(current.deadline_at, now):
            return _time_out(saga, now, f"no reply within {current.timeout:g}s")
        if _resend_due(saga, current, now):
            return _resend(saga, now)
        if current.started and _due(current.redispatch_at, now):
            return _watch_deadline_only(saga, now)
        return ignore(saga, "nothing due")
    if current.status != StepStatus.COMPENSATING or not _due(current.redispatch_at, now):
        return ignore(saga, "nothing due")
    if current.started:
        return _watch_deadline_only(saga, now)
    if _resend_due(saga, current, now):
        return _resend(saga, now)
    error = f"no reply after {current.dispatches} sends"
    return _compensation_failed(saga, CompensationFailed(saga.current_step, saga.token, error), now)


def decide(saga: SagaView, event: Event, now: datetime) -> Decision:
    """The one transition function. ``now`` is passed in, never read."""
    match event:
        case Begin():
            return _begin(saga, event, now)
        case Admit():
            return _admit(saga, now)
        case Tick():
            return _tick(saga, now)
        case StepSucceeded():
            return _step_succeeded(saga, event, now)
        case StepFailed():
            return _step_failed(saga, event, now)
        case CompensationSucceeded():
            return _compensation_succeeded(saga, event, now)
        case CompensationFailed():
            return _compensation_failed(saga, event, now)
        case OperatorRetry():
            return _operator_retry(saga, event, now)
        case OperatorDiscard():
            return _operator_discard(saga, event, now)
        case Cancel():
            return _cancel(saga, event, now)
    raise TypeError(f"unknown event {event!r}")
