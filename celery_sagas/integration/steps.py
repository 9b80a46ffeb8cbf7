"""Step and compensation tasks: check the guard, run the participant, record the outcome.

The outcome travels down the chain to the coordinator task, so a failure costs no extra
hop and no errback: ``{"outcome": "ok"|"business"|"error", "result": …, "error": …,
"attempts": n}``. Every failed attempt is a row (``saga_attempt``); retries follow the
pure retry policy, with the delay measured from the recorded attempt time.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from celery import Task

from celery_sagas.coordinator import utcnow
from celery_sagas.definition import RetryPolicy, Saga, Step, StepContext
from celery_sagas.integration.dispatcher import kwargs_repr
from celery_sagas.log import logger
from celery_sagas.policy import RetryAt, decide_retry
from celery_sagas.protocols import GuardRecord, SagaStore

MAX_ERROR = 2000
MAX_TRACEBACK = 8000


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR] + "…"


def as_outcome(guard: GuardRecord) -> dict[str, Any]:
    return {"outcome": guard.outcome, "result": guard.result, "error": guard.error}


def policy_for(
    saga: Saga, step: Step, role: str, overrides: Mapping[str, Mapping[str, Any]]
) -> RetryPolicy:
    """The step's declared policy, unless configuration overrides it by task name
    (``"order_fulfillment.refund_payment"``) or function name (``"refund_payment"``)."""
    name = step.name if role == "action" else step.compensation_name
    override = overrides.get(f"{saga.name}.{name}") or overrides.get(str(name))
    if override:
        return RetryPolicy(**override)
    return step.retry if role == "action" else step.compensation_retry


class StepTask(Task):
    """Base class of every step and compensation task (one per step and role)."""

    abstract = True
    max_retries = None  # the saga's RetryPolicy decides, not Celery's counter
    saga: Saga
    step_def: Step
    role: str  # "action" | "compensation"
    store_factory: Any
    retry_overrides: Mapping[str, Mapping[str, Any]] = {}
    redact_fields: tuple[str, ...] = ()

    def execute(
        self,
        saga_id: str,
        step: int,
        token: int,
        key: str,
        payload: dict[str, Any],
        results: dict[str, Any] | None = None,
        result: Any = None,
        attempts_before: int = 0,
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
            attempt=attempts_before + self.request.retries + 1,
            result=result,
        )
        outcome, trace = self._run(store, context, extra)
        counted = {"attempts": context.attempt}
        if outcome.outcome == "error" and self.role == "compensation":
            # A failed compensation is not recorded: an operator retry must run it again.
            return {**as_outcome(outcome), **counted, "traceback": trace}
        return {**as_outcome(store.put_guard(outcome, utcnow())), **counted}

    def _run(
        self, store: SagaStore, context: StepContext, extra: dict[str, Any]
    ) -> tuple[GuardRecord, str | None]:
        function = self.step_def.action if self.role == "action" else self.step_def.compensation
        try:
            return GuardRecord(context.idempotency_key, "ok", function(context)), None
        except Exception as exc:
            if self.role == "action" and isinstance(exc, tuple(self.step_def.business_errors)):
                logger.info(
                    "saga %s %s declined: %s",
                    context.saga_id,
                    context.step,
                    describe(exc),
                    extra=extra,
                )
                return GuardRecord(context.idempotency_key, "business", error=describe(exc)), None
            failed_at = utcnow()
            store.record_attempt(
                context.saga_id, context.idempotency_key, context.attempt, describe(exc), failed_at
            )
            self._retry_or_give_up(exc, context, extra, failed_at)
            trace = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK:]
            return GuardRecord(context.idempotency_key, "error", error=describe(exc)), trace

    def _retry_or_give_up(
        self, exc: Exception, context: StepContext, extra: dict[str, Any], failed_at: datetime
    ) -> None:
        """Retry after the policy's delay, counted from the recorded failure time."""
        policy = policy_for(self.saga, self.step_def, self.role, self.retry_overrides)
        retryable = self.role == "compensation" or isinstance(exc, tuple(self.step_def.retry_on))
        decision = decide_retry(policy, self.request.retries + 1, retryable, failed_at)
        if isinstance(decision, RetryAt):
            countdown = max(0.0, (decision.when - utcnow()).total_seconds())
            logger.warning(
                "saga %s %s %s attempt %d failed (%s); retry in %.2fs",
                context.saga_id,
                context.step,
                self.role,
                context.attempt,
                describe(exc),
                countdown,
                extra=extra,
            )
            # Celery does not carry kwargsrepr over to a retry: mask the payload again
            shown = kwargs_repr(self.request.kwargs or {}, self.redact_fields)
            raise self.retry(exc=exc, countdown=countdown, kwargsrepr=shown)
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
