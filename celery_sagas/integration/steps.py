"""Step and compensation tasks: check the guard, run the participant, record the outcome.

The outcome travels down the chain to the coordinator task, so a failure costs no extra
hop and no errback: ``{"outcome": "ok"|"business"|"error", "result": …, "error": …}``.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from celery_sagas.coordinator import utcnow
from celery_sagas.definition import Saga, Step, StepContext
from celery_sagas.log import logger
from celery_sagas.policy import RetryAt, decide_retry
from celery_sagas.protocols import GuardRecord, SagaStore


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + "…"


def as_outcome(guard: GuardRecord) -> dict[str, Any]:
    return {"outcome": guard.outcome, "result": guard.result, "error": guard.error}


class StepTask(Task):
    """Base class of every step and compensation task (one per step and role)."""

    abstract = True
    max_retries = None  # the saga's RetryPolicy decides, not Celery's counter
    saga: Saga
    step_def: Step
    role: str  # "action" | "compensation"
    store_factory: Any

    def execute(
        self,
        saga_id: str,
        step: int,
        token: int,
        key: str,
        payload: dict[str, Any],
        results: dict[str, Any] | None = None,
        result: Any = None,
    ) -> dict[str, Any]:
        store: SagaStore = self.store_factory()
        extra = {"saga_id": saga_id, "saga": self.saga.name, "step": self.step_def.name}
        recorded = store.begin_guard(key, utcnow())
        if recorded is not None:
            logger.info(
                "saga %s %s: duplicate delivery, returning the recorded %s outcome",
                saga_id,
                key,
                recorded.outcome,
                extra=extra,
            )
            return as_outcome(recorded)
        context = StepContext(
            saga_id=saga_id,
            saga=self.saga.name,
            step=self.step_def.name,
            payload=payload,
            results=results or {},
            idempotency_key=key,
            attempt=self.request.retries + 1,
            result=result,
        )
        outcome = self._run(context, extra)
        if outcome.outcome == "error" and self.role == "compensation":
            # A failed compensation is not recorded: an operator retry must run it again.
            return {**as_outcome(outcome), "attempts": context.attempt}
        return {**as_outcome(store.put_guard(outcome, utcnow())), "attempts": context.attempt}

    def _run(self, context: StepContext, extra: dict[str, Any]) -> GuardRecord:
        function = self.step_def.action if self.role == "action" else self.step_def.compensation
        try:
            return GuardRecord(context.idempotency_key, "ok", function(context))
        except Exception as exc:
            if self.role == "action" and isinstance(exc, tuple(self.step_def.business_errors)):
                logger.info(
                    "saga %s %s declined: %s",
                    context.saga_id,
                    context.step,
                    describe(exc),
                    extra=extra,
                )
                return GuardRecord(context.idempotency_key, "business", error=describe(exc))
            self._retry_or_give_up(exc, context, extra)
            return GuardRecord(context.idempotency_key, "error", error=describe(exc))

    def _retry_or_give_up(
        self, exc: Exception, context: StepContext, extra: dict[str, Any]
    ) -> None:
        if self.role == "action":
            policy = self.step_def.retry
            retryable = isinstance(exc, tuple(self.step_def.retry_on))
        else:
            policy, retryable = self.step_def.compensation_retry, True
        decision = decide_retry(policy, context.attempt, retryable, utcnow())
        if isinstance(decision, RetryAt):
            logger.warning(
                "saga %s %s %s attempt %d failed (%s); retry in %.2fs",
                context.saga_id,
                context.step,
                self.role,
                context.attempt,
                describe(exc),
                decision.delay,
                extra=extra,
            )
            raise self.retry(exc=exc, countdown=decision.delay)
        logger.error(
            "saga %s %s %s gave up after %d attempt(s): %s (%s)",
            context.saga_id,
            context.step,
            self.role,
            context.attempt,
            describe(exc),
            decision.reason,
            extra=extra,
        )
