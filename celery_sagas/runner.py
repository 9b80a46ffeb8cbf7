"""The one step path, Celery-free: check → guard → run → classify.

The step task (in both modes) and the testing driver run every step message through
``StepRunner.run``; they differ only in how they wait before a retry and in who records
the outcome (the step's own worker through ``Coordinator.handle``, or the chain's
coordinator task).

1. check: the message names this task's step and carries the key the saga would compute
   (else ``bad key``); the saga exists (``unknown saga``), is live and waits for exactly
   this step, role and token (``stale``; ``late`` when the step already timed out).
   Marking the step started happens in the same store call, and only when the saga
   expects it: an ignored message writes nothing and runs nothing.
2. guard: a final outcome recorded earlier (a duplicate delivery) is returned as it is.
3. run the participant; 4. classify what it raised: declined (a business error), retry
   later (retryable, by the step's policy), or failed.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from celery_sagas.definition import RetryPolicy, Saga, Step, StepContext, idempotency_key
from celery_sagas.encoding import encode_result
from celery_sagas.errors import StepHardLimitExceeded, StoreUnavailableError
from celery_sagas.heartbeat import Heartbeats
from celery_sagas.log import logger
from celery_sagas.machine import FORWARD_STATES, LIVE_STATES, ErrorKind, Role, StepStatus
from celery_sagas.policy import RetryAt, decide_retry
from celery_sagas.protocols import (
    Expectation,
    GuardOutcome,
    GuardRecord,
    SagaRecord,
    SagaStore,
    same_definition,
)
from celery_sagas.redaction import scrub, secret_values
from celery_sagas.settings import DEFAULT_REDACT_FIELDS
from celery_sagas.step_reply import StepReply

MAX_ERROR = 2000
MAX_TRACEBACK = 8000
# what a lost connection raises, by class name anywhere in its MRO (driver-agnostic)
CONNECTION_ERROR_NAMES = frozenset(
    {"ConnectionError", "TimeoutError", "OperationalError", "InterfaceError", "DisconnectionError"}
)

# the participant's time limits when the worker enforces them (``integration.alarm``)
Limits = Callable[[], AbstractContextManager[object]]

BAD_KEY = "bad key"
UNKNOWN_SAGA = "unknown saga"
STALE = "stale"
LATE = "late"
RUNNING = "running"  # another delivery runs this untimed step and beats


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR] + "…"


def is_connection_error(exc: BaseException) -> bool:
    """A connection-level failure (database or broker unreachable): worth retrying."""
    return any(cls.__name__ in CONNECTION_ERROR_NAMES for cls in type(exc).__mro__)


class ParticipantError(Exception):
    """A participant's failure as Celery's retry shows it: its text, scrubbed of secrets."""


@dataclass(frozen=True)
class StepMessage:
    """A step or compensation message as its task receives it (the task's kwargs)."""

    saga_id: str
    step: int
    token: int
    key: str
    payload: Mapping[str, Any] | None = None
    results: Mapping[str, Any] | None = None
    result: Any = None
    attempts_before: int = 0

    @classmethod
    def parse(cls, kwargs: Mapping[str, Any]) -> StepMessage | None:
        """The message, or None (logged) if its fields are missing or of the wrong type."""
        try:
            return cls.of(kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("step message ignored (malformed: %s)", describe(exc))
            return None

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> StepMessage:
        return cls(
            saga_id=str(kwargs["saga_id"]),
            step=int(kwargs["step"]),
            token=int(kwargs["token"]),
            key=str(kwargs["key"]),
            payload=kwargs.get("payload"),
            results=kwargs.get("results"),
            result=kwargs.get("result"),
            attempts_before=int(kwargs.get("attempts_before") or 0),
        )


@dataclass(frozen=True)
class Ignored:
    """The saga does not expect this message: nothing ran, nothing was written."""

    reason: str  # BAD_KEY | UNKNOWN_SAGA | STALE | LATE
    detail: str


@dataclass(frozen=True)
class Finished:
    """The step's reply, the guard record still to write with it (None: recorded before,
    or a failed compensation, which stays re-runnable) and the saga as read."""

    reply: StepReply
    to_record: GuardRecord | None
    snapshot: SagaRecord | None


@dataclass(frozen=True)
class OtherDefinition:
    """The saga started with another definition (version) of this saga than the one this
    worker runs: nothing ran; a worker that has it must take the message."""

    definition: str | None


@dataclass(frozen=True)
class Resend:
    """A stale message whose own delivery began the saga's current step (run inline, in
    this delivery's task: ``inline_steps``) and died with no outcome: its process was
    killed, and the broker gave the message back. Nothing ran; the step is sent again."""

    step: int
    token: int
    key: str  # the step's guard key, whose started marker names the dead delivery
    detail: str


@dataclass(frozen=True)
class RetryLater:
    """The participant failed and its policy retries it at ``when``."""

    when: datetime
    error: Exception
    attempt: int


StepRun = Ignored | Finished | RetryLater | OtherDefinition | Resend


def mismatch(saga: Saga, index: int, role: Role, message: StepMessage) -> Ignored | None:
    """Pure: a message whose step or key is not this task's (forged or misrouted)."""
    expected = idempotency_key(message.saga_id, saga.steps[index].name, role)
    if message.step != index or message.key != expected:
        return Ignored(BAD_KEY, f"step {message.step} key {message.key!r}, expected {expected!r}")
    return None


def unexpected(record: SagaRecord | None, index: int, role: Role, token: int) -> Ignored | None:
    """Pure: why the saga (as read) does not wait for this step, role and token."""
    if record is None:
        return Ignored(UNKNOWN_SAGA, "no such saga")
    step = record.steps[index] if index < len(record.steps) else None
    timed_out = step is not None and (
        step.status == StepStatus.TIMED_OUT or step.error_kind == ErrorKind.TIMEOUT
    )
    if step is not None and role == Role.ACTION and timed_out:
        return Ignored(LATE, f"{step.name} already timed out")
    expectation = Expectation(index, token, role)
    if record.state not in expectation.states:
        return Ignored(STALE, f"saga is {record.state}")
    if record.current_step != index or record.token != token:
        return Ignored(
            STALE,
            f"saga waits for step {record.current_step} token {record.token}, "
            f"not step {index} token {token}",
        )
    return None


def abandoned_by(
    saga: Saga,
    record: SagaRecord,
    guard_of: Callable[[str], GuardRecord | None],
    delivery: str,
) -> Resend | None:
    """The saga's current step, if ``delivery`` began it and it has no outcome (its
    ``started`` marker names the delivery): what a redelivered message finds when its
    process died running a later step inline. ``guard_of``: a key's guard row."""
    if record.state not in LIVE_STATES:
        return None
    index = record.current_step
    role = Role.ACTION if record.state in FORWARD_STATES else Role.COMPENSATION
    key = idempotency_key(record.saga_id, saga.steps[index].name, role)
    guard = guard_of(key)
    if guard is None or guard.outcome != GuardOutcome.STARTED or guard.result != delivery:
        return None
    detail = (
        f"step {index} {role} was begun by delivery {delivery}, which died before it "
        "finished (run inline): sending it again"
    )
    return Resend(index, record.token, key, detail)


def running_elsewhere(
    guard: GuardRecord | None, delivery: str | None, now: datetime, lease: float
) -> Ignored | None:
    """Pure: another delivery began this untimed step and was heard from within ``lease``
    (its heartbeat): a second copy of the message (the scan's re-send of one that waited
    in a busy queue) must not run the participant again beside it. A marker silent for
    the lease is taken over: its worker is gone."""
    if guard is None or guard.outcome != GuardOutcome.STARTED or delivery is None:
        return None
    if guard.result in (None, delivery) or guard.recorded_at is None:
        return None
    silent = now - guard.recorded_at
    if silent >= timedelta(seconds=lease):
        return None
    return Ignored(
        RUNNING, f"delivery {guard.result} runs it, heard from {silent.total_seconds():.0f}s ago"
    )


def classify(step: Step, role: Role, exc: BaseException, interrupted: tuple[type, ...]) -> str:
    """Pure: ``business`` (declined, did not act), ``retry``, ``reconnect`` (a lost
    connection: retried with the step's ``connection_retry``), ``timeout`` or ``error``
    (may have acted).

    An interrupted action (its soft time limit) is not retried: it timed out and is
    compensated. A compensation is retried whatever it raised (it must finish)."""
    if role == Role.COMPENSATION:
        return "retry"
    if isinstance(exc, tuple(step.business_errors)):
        return "business"
    if isinstance(exc, (*interrupted, StepHardLimitExceeded)):
        return "timeout"
    if isinstance(exc, tuple(step.retry_on)):
        return "retry"
    if step.retry_connection_errors and is_connection_error(exc):
        return "reconnect"
    return "error"


def policy_for(
    saga: Saga, step: Step, role: Role, overrides: Mapping[str, Mapping[str, Any]]
) -> RetryPolicy:
    """The step's declared policy, unless configuration overrides it by task name
    (``"order_fulfillment.refund_payment"``) or function name (``"refund_payment"``)."""
    name = step.name if role == Role.ACTION else step.compensation_name
    override = overrides.get(f"{saga.name}.{name}") or overrides.get(str(name))
    if override:
        return RetryPolicy(**override)
    return step.retry if role == Role.ACTION else step.compensation_retry


class StepRunner:
    """Runs one step's action or compensation for a message, behind the check and guard."""

    def __init__(
        self,
        saga: Saga,
        index: int,
        role: Role,
        policy: RetryPolicy,
        clock: Callable[[], datetime],
        interrupted: tuple[type[BaseException], ...] = (),
        function: Callable[[StepContext], Any] | None = None,
        redact_fields: Sequence[str] = DEFAULT_REDACT_FIELDS,
        heartbeats: Heartbeats | None = None,
    ) -> None:
        """``heartbeats``: for a step without a timeout, what keeps its ``started`` marker
        fresh while it runs (the scan re-sends a step whose worker stopped beating)."""
        self.saga = saga
        self.index = index
        self.role = role
        self.step = saga.steps[index]
        self.policy = policy
        self.clock = clock
        self.interrupted = interrupted
        self.redact_fields = tuple(redact_fields)
        default = self.step.action if role == Role.ACTION else self.step.compensation
        self.function = function or default
        self.heartbeats = heartbeats

    def run(
        self,
        store: SagaStore,
        message: StepMessage,
        tries: int = 1,
        delivery: str | None = None,
        limits: Limits | None = None,
    ) -> StepRun:
        """``tries``: this delivery's try of the participant (1 unless a retry);
        ``delivery``: the Celery task id of the message being worked on (the step's
        ``started`` marker names it); ``limits``: the participant's time limits, when the
        worker enforces them itself (an inline run), not Celery."""
        refused = mismatch(self.saga, self.index, self.role, message)
        if refused is not None:
            return self._ignored(message, refused)
        fingerprint = self.saga.fingerprint
        expectation = Expectation(self.index, message.token, self.role, fingerprint)
        now = self.clock()
        if self.heartbeats is not None:  # untimed: its worker beats while it runs
            lease = self.heartbeats.lease
            elsewhere = running_elsewhere(store.get_guard(message.key), delivery, now, lease)
            if elsewhere is not None:
                return self._ignored(message, elsewhere)
        recorded, snapshot = store.begin_step(
            message.key, message.saga_id, now, expectation, delivery
        )
        if snapshot is not None and not same_definition(snapshot, fingerprint):
            logger.info(
                "saga %s: started with definition %s, not %s: left to a worker that has it",
                message.saga_id,
                snapshot.definition,
                fingerprint,
                extra=self._extra(message.saga_id),
            )
            return OtherDefinition(snapshot.definition)
        refused = unexpected(snapshot, self.index, self.role, message.token)
        if refused is not None and refused.reason == STALE and delivery is not None:
            assert snapshot is not None
            resend = abandoned_by(self.saga, snapshot, store.get_guard, delivery)
            if resend is not None:
                logger.warning(
                    "saga %s: %s",
                    message.saga_id,
                    resend.detail,
                    extra=self._extra(message.saga_id),
                )
                return resend
        if refused is not None:
            return self._ignored(message, refused)
        if recorded is not None:
            logger.info(
                "saga %s %s: duplicate delivery, returning the recorded %s outcome",
                message.saga_id,
                message.key,
                recorded.outcome,
                extra=self._extra(message.saga_id),
            )
            return Finished(StepReply.recorded(recorded), None, snapshot)
        assert snapshot is not None
        if self.heartbeats is None:
            return self._call(store, message, snapshot, tries, limits)
        with self.heartbeats.beating(message.key, delivery):
            run = self._call(store, message, snapshot, tries, limits)
        if isinstance(run, RetryLater):
            self.heartbeats.hold_until(store, message.key, delivery, run.when)
        return run

    def run_command(self, message: StepMessage, tries: int = 1) -> StepRun:
        """A signed command on a worker without the saga database (``coordinator_hop``):
        the signature was verified; the participant runs behind the idempotency key it is
        handed, and the coordinator task records the outcome (and ignores a stale one)."""
        refused = mismatch(self.saga, self.index, self.role, message)
        if refused is None and message.payload is None:
            refused = Ignored(BAD_KEY, "a command without its payload")
        if refused is not None:
            return self._ignored(message, refused)
        return self._call(None, message, None, tries)

    def context(self, message: StepMessage, snapshot: SagaRecord | None, tries: int) -> StepContext:
        """What the participant gets; data the message does not carry comes from the saga."""
        results = message.results
        if results is None and snapshot is not None:
            results = {k: v for k, v in snapshot.results().items() if k in self.saga.step_names}
        result = message.result
        if result is None and snapshot is not None and self.role == Role.COMPENSATION:
            result = snapshot.steps[self.index].result
        payload = message.payload
        if payload is None and snapshot is not None:
            payload = snapshot.payload
        return StepContext(
            saga_id=message.saga_id,
            saga=self.saga.name,
            step=self.step.name,
            payload=payload or {},
            results=results or {},
            idempotency_key=message.key,
            attempt=message.attempts_before + tries,
            result=result,
        )

    def _call(
        self,
        store: SagaStore | None,
        message: StepMessage,
        snapshot: SagaRecord | None,
        tries: int,
        limits: Limits | None = None,
    ) -> StepRun:
        context = self.context(message, snapshot, tries)
        try:
            with limits() if limits is not None else nullcontext():
                value = self.function(context)
            # a result JSON cannot carry fails the step now, naming it (never a silent timeout)
            result = encode_result(value, self.step.name)
        except (Exception, StepHardLimitExceeded) as exc:
            said = self._said(describe(exc), context)
            kind = classify(self.step, self.role, exc, self.interrupted)
            if kind == "business":
                logger.info(
                    "saga %s %s declined: %s",
                    message.saga_id,
                    self.step.name,
                    said,
                    extra=self._extra(message.saga_id),
                )
                declined = GuardRecord(message.key, GuardOutcome.BUSINESS, error=said)
                reply = StepReply(GuardOutcome.BUSINESS, None, said, context.attempt)
                return Finished(reply, declined, snapshot)
            policy = self.step.connection_retry if kind == "reconnect" else self.policy
            retryable = kind in ("retry", "reconnect")
            run = self._failed(store, context, exc, said, retryable, tries, snapshot, policy)
            if kind == "timeout" and isinstance(run, Finished):
                return replace(run, reply=replace(run.reply, timed_out=True))
            return run
        ok = GuardRecord(message.key, GuardOutcome.OK, result)
        return Finished(StepReply(GuardOutcome.OK, result, None, context.attempt), ok, snapshot)

    def _said(self, text: str, context: StepContext) -> str:
        """``text`` without the payload's secrets (an error that quoted an address)."""
        return scrub(text, secret_values(context.payload, self.redact_fields))

    def _failed(
        self,
        store: SagaStore | None,
        context: StepContext,
        exc: BaseException,
        said: str,
        retryable: bool,
        tries: int,
        snapshot: SagaRecord | None,
        policy: RetryPolicy,
    ) -> StepRun:
        failed_at = self.clock()
        extra = self._extra(context.saga_id)
        try:
            if store is not None:  # a worker without the saga database keeps no attempt rows
                store.record_attempt(
                    context.saga_id, context.idempotency_key, context.attempt, said, failed_at
                )
        except StoreUnavailableError as lost:  # the policy still decides; the row is lost
            logger.warning(
                "saga %s %s: attempt not recorded: %s",
                context.saga_id,
                context.step,
                lost,
                extra=extra,
            )
        decision = decide_retry(policy, tries, retryable, failed_at)
        if isinstance(decision, RetryAt):
            logger.warning(
                "saga %s %s %s attempt %d failed (%s); retry in %.2fs",
                context.saga_id,
                context.step,
                self.role,
                context.attempt,
                said,
                decision.delay,
                extra=extra,
            )
            return RetryLater(decision.when, ParticipantError(said), context.attempt)
        logger.error(
            "saga %s %s %s gave up after %d attempt(s): %s (%s)",
            context.saga_id,
            context.step,
            self.role,
            context.attempt,
            said,
            decision.reason,
            extra=extra,
        )
        trace = self._said("".join(traceback.format_exception(exc)), context)[-MAX_TRACEBACK:]
        reply = StepReply(GuardOutcome.ERROR, None, said, context.attempt, trace)
        # a failed compensation is not recorded: an operator retry must run it again
        to_record = (
            None
            if self.role == Role.COMPENSATION
            else GuardRecord(context.idempotency_key, GuardOutcome.ERROR, error=said)
        )
        return Finished(reply, to_record, snapshot)

    def refuse(self, message: StepMessage, reason: str, detail: str) -> Ignored:
        """Refuse a message for a reason found outside the runner (a bad signature)."""
        return self._ignored(message, Ignored(reason, detail))

    def _ignored(self, message: StepMessage, ignored: Ignored) -> Ignored:
        log = logger.info if ignored.reason in (STALE, LATE, RUNNING) else logger.warning
        log(
            "saga %s step %s %s: message ignored (%s: %s)",
            message.saga_id,
            message.step,
            self.role,
            ignored.reason,
            ignored.detail,
            extra={**self._extra(message.saga_id), "reason": ignored.reason},
        )
        return ignored

    def _extra(self, saga_id: str) -> dict[str, Any]:
        return {"saga_id": saga_id, "saga": self.saga.name, "step": self.step.name}
