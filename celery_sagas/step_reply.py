"""What one run of a step's action or compensation came to: the ``StepReply`` the runner
returns and the coordinator turns into a machine event.

It is a frozen value everywhere but at the Celery edge, where it travels as JSON: a step
task's return value, the chain's hand-down to the coordinator task (``coordinator_hop``)
and the outcome a store retry carries. That JSON is the shape step tasks have always sent,
so messages in flight through a rolling deploy are read either way::

    {"outcome": "ok" | "business" | "error", "result": …, "error": …}

plus ``"attempts"``, ``"traceback"`` and ``"timed_out": true`` when there are any.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery_sagas.machine import (
    CompensationFailed,
    CompensationSucceeded,
    Event,
    Role,
    StepFailed,
    StepSucceeded,
)
from celery_sagas.records import GuardOutcome, GuardRecord

UNKNOWN_ERROR = "unknown error"  # a failure that did not say why
# the outcomes a finished run can have; any other (a malformed reply) counts as an error
FINAL_OUTCOMES = {o.value: o for o in (GuardOutcome.OK, GuardOutcome.BUSINESS, GuardOutcome.ERROR)}


@dataclass(frozen=True)
class StepReply:
    outcome: GuardOutcome  # OK; BUSINESS: declined, did not act; ERROR: may have acted
    result: Any = None
    error: str | None = None
    attempts: int | None = None  # runs of the participant (None: a recorded outcome)
    traceback: str | None = None
    timed_out: bool = False  # interrupted at its time limit: it may have acted

    @classmethod
    def recorded(cls, guard: GuardRecord) -> StepReply:
        """The outcome a guard recorded earlier, returned again to a duplicate delivery."""
        return cls(guard.outcome, guard.result, guard.error)

    def event(self, role: Role, step: int, token: int) -> Event:
        """The machine event this reply is, for the step's ``role``."""
        ok = self.outcome == GuardOutcome.OK
        if role == Role.ACTION:
            if ok:
                return StepSucceeded(step, token, self.result, self.attempts)
            business = self.outcome == GuardOutcome.BUSINESS
            error = self.error or UNKNOWN_ERROR
            return StepFailed(step, token, error, business, self.attempts, self.timed_out)
        if ok:
            return CompensationSucceeded(step, token, self.result, self.attempts)
        return CompensationFailed(
            step, token, self.error or UNKNOWN_ERROR, self.attempts, self.traceback
        )

    def to_json(self) -> dict[str, Any]:
        """The wire shape (keys in the order step tasks have always sent them)."""
        value: dict[str, Any] = {
            "outcome": self.outcome.value,
            "result": self.result,
            "error": self.error,
        }
        if self.attempts is not None:
            value["attempts"] = self.attempts
        if self.traceback is not None:
            value["traceback"] = self.traceback
        if self.timed_out:
            value["timed_out"] = True
        return value

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> StepReply:
        """A reply from the wire, as lenient as the dict reader it replaces: an unknown
        ``outcome`` is an error, missing fields are absent."""
        said = value.get("outcome")
        return cls(
            FINAL_OUTCOMES.get(said, GuardOutcome.ERROR)
            if isinstance(said, str)
            else GuardOutcome.ERROR,
            value.get("result"),
            value.get("error"),
            value.get("attempts"),
            value.get("traceback"),
            bool(value.get("timed_out")),
        )
