"""What can happen to a saga: the events ``decide`` is called with.

Worker replies carry the step and the dispatch token they were sent with, so a late or
duplicate reply can be told from the one the saga waits for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    timed_out: bool = False  # interrupted at its time limit: it may have acted


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
class Abandoned:
    """The delivery that began the current step died with no outcome, and no message of
    the step is left to redeliver: it ran inline, in an earlier step's task
    (``inline_steps``), whose message came back. Send the step again (same token)."""

    step: int
    token: int
    reason: str


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


@dataclass(frozen=True)
class Migrated:
    """An operator moved the saga, at a step boundary, onto another version of its
    definition (its steps already rewritten): send the current step under it."""

    actor: str
    reason: str


Event = (
    Migrated
    | Abandoned
    | Begin
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
