"""What can happen to a saga: the events ``decide`` is called with.

Worker replies carry the step and the dispatch token they were sent with, so a late or
duplicate reply can be told from the one the saga waits for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery_sagas.machine.types import Role


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


def outcome_event(role: Role, step: int, token: int, outcome: Mapping[str, Any]) -> Event:
    """The event a step task's outcome is, for its ``role``.

    ``outcome``: ``{"outcome": "ok"|"business"|"error", "result", "error", "attempts",
    "traceback", "timed_out"}`` (what a step task returns, or hands down the chain)."""
    ok = outcome.get("outcome") == "ok"
    attempts = outcome.get("attempts")
    error = outcome.get("error") or "unknown error"
    if role == Role.ACTION:
        if ok:
            return StepSucceeded(step, token, outcome.get("result"), attempts)
        business = outcome.get("outcome") == "business"
        return StepFailed(step, token, error, business, attempts, bool(outcome.get("timed_out")))
    if ok:
        return CompensationSucceeded(step, token, outcome.get("result"), attempts)
    return CompensationFailed(step, token, error, attempts, outcome.get("traceback"))
