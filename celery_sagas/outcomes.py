"""What became of a saga: its state, reason and each step's status and result.

Pure values read from a ``SagaRecord`` (``outcome_of``) or from a record and the decision
about to be committed (``outcome_after``), which is what an outcome hook receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery_sagas.machine import SETTLED_STATES, Decision, SagaState, StepStatus
from celery_sagas.protocols import SagaRecord


@dataclass(frozen=True)
class StepOutcome:
    name: str
    status: StepStatus
    result: Any = None
    error: str | None = None


@dataclass(frozen=True)
class SagaOutcome:
    """A saga as it stands. ``settled``: COMPLETED, FAILED or COMPENSATION_FAILED (the
    last waits for an operator and may still become FAILED)."""

    saga_id: str
    name: str
    business_key: str
    state: SagaState
    reason: str | None
    steps: tuple[StepOutcome, ...]
    finished_at: datetime | None = None

    @property
    def settled(self) -> bool:
        return self.state in SETTLED_STATES

    @property
    def results(self) -> dict[str, Any]:
        """The results of the completed steps, by step name."""
        return {s.name: s.result for s in self.steps if s.status == StepStatus.COMPLETED}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: what an outcome hook receives as ``outcome``."""
        return {
            "state": self.state.value,
            "reason": self.reason,
            "steps": [
                {"name": s.name, "status": s.status.value, "result": s.result, "error": s.error}
                for s in self.steps
            ],
        }


def outcome_of(record: SagaRecord) -> SagaOutcome:
    return SagaOutcome(
        saga_id=record.saga_id,
        name=record.name,
        business_key=record.business_key,
        state=record.state,
        reason=record.reason,
        steps=tuple(StepOutcome(s.name, s.status, s.result, s.error) for s in record.steps),
        finished_at=record.finished_at,
    )


def outcome_after(record: SagaRecord, decision: Decision) -> SagaOutcome:
    """The outcome once ``decision`` is applied to ``record`` (state, reason, steps)."""
    steps = {s.index: StepOutcome(s.name, s.status, s.result, s.error) for s in record.steps}
    for change in decision.step_changes:
        step = steps[change.index]
        steps[change.index] = StepOutcome(
            step.name,
            change.new,
            change.result if change.has_result else step.result,
            change.error if change.error is not None else step.error,
        )
    before = outcome_of(record)
    return SagaOutcome(
        saga_id=before.saga_id,
        name=before.name,
        business_key=before.business_key,
        state=decision.state or before.state,
        reason=decision.reason if decision.reason is not None else before.reason,
        steps=tuple(steps[i] for i in sorted(steps)),
        finished_at=before.finished_at,
    )
