"""Step and compensation tasks: check the guard, run the participant, record the outcome,
then apply it to the saga.

The outcome is ``{"outcome": "ok"|"business"|"error", "result": …, "error": …,
"attempts": n}``. By default the step task applies it itself, in the same worker process
(one coordinator transaction, then the next step is published): a step costs one task hop.
With ``coordinator_hop`` it travels down the chain to the coordinator task
(``celery_sagas.advance``) instead. Either way a failure costs no errback. Every failed
attempt is a row (``saga_attempt``); retries follow the pure retry policy, with the delay
measured from the recorded attempt time.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Task

from celery_sagas import machine
from celery_sagas.coordinator import utcnow
from celery_sagas.definition import RetryPolicy, Saga, Step, StepContext
from celery_sagas.errors import ConcurrentUpdateError, StoreUnavailableError
from celery_sagas.integration.dispatcher import kwargs_repr
from celery_sagas.log import logger
from celery_sagas.policy import RetryAt, decide_retry
from celery_sagas.protocols import GuardRecord, SagaRecord, SagaStore

MAX_ERROR = 2000
MAX_TRACEBACK = 8000
STORE_RETRY_CAP = 30.0  # seconds between attempts to apply an outcome while the store is down
# the kwarg a retry of a failed apply carries: the outcome the participant already produced
CARRIED = "applying"
# the kwarg counting retries that only waited for the store (not tries of the participant)
STORE_RETRIES = "store_retries"


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR] + "…"


def as_outcome(guard: GuardRecord) -> dict[str, Any]:
    return {"outcome": guard.outcome, "result": guard.result, "error": guard.error}


@dataclass(frozen=True)
class StepRun:
    """What one delivery of a step task produced: the outcome handed to the coordinator,
    and the guard record still to be written (None: recorded before, or not recorded)."""

    outcome: dict[str, Any]
    to_record: GuardRecord | None = None
    snapshot: SagaRecord | None = None  # the saga as read when the step began

    def recorded(self, winner: GuardRecord) -> StepRun:
        """After ``put_guard``: the outcome is whichever record won."""
        return StepRun({**self.outcome, **as_outcome(winner)})

    def carried(self, tries: int) -> dict[str, Any]:
        """This run as a retry message's kwarg (JSON): applying it failed ``tries`` times."""
        guard = self.to_record
        return {
            "outcome": self.outcome,
            "guard": None if guard is None else as_outcome(guard) | {"key": guard.key},
            "tries": tries,
        }

    @staticmethod
    def from_carried(carried: dict[str, Any]) -> StepRun:
        guard = carried.get("guard")
        to_record = None
        if guard is not None:
            to_record = GuardRecord(guard["key"], guard["outcome"], guard["result"], guard["error"])
        return StepRun(carried["outcome"], to_record)


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
    # applies an outcome (and records its guard) in one transaction and publishes what
    # follows; None when the chain's coordinator task (``coordinator_hop``) does it
    apply_outcome: (
        Callable[[str, machine.Event, GuardRecord | None, SagaRecord | None], str | None] | None
    ) = None

    def perform(self, **kwargs: Any) -> dict[str, Any]:
        """The task body: run the step behind its guard; then either record the outcome and
        hand it down the chain (``coordinator_hop``), or record it and apply it to the saga
        in one transaction.

        The store failing is retried with capped exponential backoff and never counts
        against the step's retry policy: before the participant ran, the task runs later
        (``store_retries`` counts those retries out of the attempt numbers); after, the
        retry carries the outcome (``applying``) and only records and applies it, without
        running the participant again."""
        carried = kwargs.pop(CARRIED, None)
        try:
            run = StepRun.from_carried(carried) if carried else self.execute(**kwargs)
        except StoreUnavailableError as exc:  # the guard could not be read: nothing ran
            waited = int(kwargs.get(STORE_RETRIES, 0))
            again = {**kwargs, STORE_RETRIES: waited + 1}
            raise self._retry_for_store(exc, "begin", waited, again) from exc
        try:
            return self._finish(run, kwargs)
        except (StoreUnavailableError, ConcurrentUpdateError) as exc:
            tries = int((carried or {}).get("tries", 0))
            again = {**kwargs, CARRIED: run.carried(tries + 1)}
            raise self._retry_for_store(exc, "record the outcome of", tries, again) from exc

    def _finish(self, run: StepRun, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.apply_outcome is None:  # the chain's coordinator task applies it
            if run.to_record is not None:
                run = run.recorded(self.store_factory().put_guard(run.to_record, utcnow()))
            return run.outcome
        event = machine.outcome_event(self.role, kwargs["step"], kwargs["token"], run.outcome)
        self.apply_outcome(kwargs["saga_id"], event, run.to_record, run.snapshot)
        return run.outcome

    def _retry_for_store(
        self, exc: Exception, doing: str, failures: int, kwargs: dict[str, Any]
    ) -> Exception:
        """A retry of this task with ``kwargs`` after ``failures`` earlier store failures."""
        countdown = min(STORE_RETRY_CAP, 2.0**failures) * random.uniform(0.8, 1.2)
        self._log_store_retry(kwargs["saga_id"], doing, exc, countdown)
        shown = kwargs_repr(kwargs, self.redact_fields)
        retry: Exception = self.retry(exc=exc, countdown=countdown, kwargs=kwargs, kwargsrepr=shown)
        return retry

    def _log_store_retry(self, saga_id: str, doing: str, exc: Exception, wait: float) -> None:
        logger.warning(
            "saga %s %s: cannot %s the %s (%s); retry in %.0fs",
            saga_id,
            self.step_def.name,
            doing,
            self.role,
            exc,
            wait,
            extra={"saga_id": saga_id, "saga": self.saga.name, "step": self.step_def.name},
        )

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
        store_retries: int = 0,
    ) -> StepRun:
        """Check the guard and run the participant unless an outcome is recorded. A step
        task that applies its own outcome reads the saga in the same round trip, to decide
        on afterwards (the compare-and-set catches a saga that changed meanwhile)."""
        store: SagaStore = self.store_factory()
        extra = {"saga_id": saga_id, "saga": self.saga.name, "step": self.step_def.name}
        snapshot = None
        if self.apply_outcome is None:
            recorded = store.begin_guard(key, utcnow())
        else:
            recorded, snapshot = store.begin_step(key, saga_id, utcnow())
        if recorded is not None:
            logger.info(
                "saga %s %s: duplicate delivery, returning the recorded %s outcome",
                saga_id,
                key,
                recorded.outcome,
                extra=extra,
            )
            return StepRun(as_outcome(recorded), snapshot=snapshot)
        context = StepContext(
            saga_id=saga_id,
            saga=self.saga.name,
            step=self.step_def.name,
            payload=payload,
            results=results or {},
            idempotency_key=key,
            attempt=attempts_before + self._tries(store_retries),
            result=result,
        )
        outcome, trace = self._run(store, context, extra, self._tries(store_retries))
        counted = {"attempts": context.attempt}
        if outcome.outcome == "error" and self.role == "compensation":
            # A failed compensation is not recorded: an operator retry must run it again.
            return StepRun({**as_outcome(outcome), **counted, "traceback": trace}, None, snapshot)
        return StepRun({**as_outcome(outcome), **counted}, outcome, snapshot)

    def _tries(self, store_retries: int) -> int:
        """This delivery's try of the participant: Celery's retries, less the retries
        that only waited for the store."""
        return int(self.request.retries) - store_retries + 1

    def _run(
        self, store: SagaStore, context: StepContext, extra: dict[str, Any], tries: int
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
            try:
                store.record_attempt(
                    context.saga_id,
                    context.idempotency_key,
                    context.attempt,
                    describe(exc),
                    failed_at,
                )
            except StoreUnavailableError as lost:  # the policy still decides; the row is lost
                logger.warning(
                    "saga %s %s: attempt not recorded: %s",
                    context.saga_id,
                    context.step,
                    lost,
                    extra=extra,
                )
            self._retry_or_give_up(exc, context, extra, failed_at, tries)
            trace = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK:]
            return GuardRecord(context.idempotency_key, "error", error=describe(exc)), trace

    def _retry_or_give_up(
        self,
        exc: Exception,
        context: StepContext,
        extra: dict[str, Any],
        failed_at: datetime,
        tries: int,
    ) -> None:
        """Retry after the policy's delay, counted from the recorded failure time."""
        policy = policy_for(self.saga, self.step_def, self.role, self.retry_overrides)
        retryable = self.role == "compensation" or isinstance(exc, tuple(self.step_def.retry_on))
        decision = decide_retry(policy, tries, retryable, failed_at)
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
