"""Step and compensation tasks: the Celery edge of the one step path (``runner``).

The outcome is a ``StepReply``, returned as its JSON (``{"outcome": "ok"|"business"|
"error", "result": …, "error": …, "attempts": n}``). By default the step task applies it
itself, in the same worker process (one coordinator transaction, then the next step is
published): a step costs one task hop. With ``coordinator_hop`` it travels down the chain
to the coordinator task (``celery_sagas.advance``) instead, with its guard's ``key``. A
message the saga does not expect returns ``{"outcome": "ignored", "reason": …}`` and
changes nothing. Each task has Celery time limits derived from the step's timeout: the
soft limit interrupts the participant (``SoftTimeLimitExceeded``: the step timed out and
is compensated), the hard limit replaces its pool child (``on_failure`` records the step
as timed out).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Reject, Retry, TimeLimitExceeded
from kombu.utils.uuid import uuid

from celery_sagas import machine
from celery_sagas.coordinator import utcnow
from celery_sagas.definition import Saga, Step
from celery_sagas.errors import (
    ConcurrentUpdateError,
    StoreUnavailableError,
    UnknownDefinitionError,
)
from celery_sagas.integration.dispatcher import kwargs_repr
from celery_sagas.integration.inline import FollowUp, InlineRun, InlineSteps
from celery_sagas.log import logger
from celery_sagas.protocols import GuardOutcome, GuardRecord
from celery_sagas.runner import (
    Finished,
    Ignored,
    OtherDefinition,
    Resend,
    RetryLater,
    StepMessage,
    StepRun,
    StepRunner,
    abandoned_by,
)
from celery_sagas.signing import refusal
from celery_sagas.step_reply import StepReply

STORE_RETRY_CAP = 30.0  # seconds between attempts to apply an outcome while the store is down
# the kwarg a retry of a failed apply carries: the outcome the participant already produced
CARRIED = "applying"
# the kwarg counting retries that only waited for the store (not tries of the participant)
STORE_RETRIES = "store_retries"


def handed_down(run: Finished) -> dict[str, Any]:
    """The reply as a chain hands it to the coordinator task (JSON), with the key of the
    guard it records (``coordinator_hop``)."""
    reply = run.reply.to_json()
    return reply if run.to_record is None else {**reply, "key": run.to_record.key}


def as_outcome(guard: GuardRecord) -> dict[str, Any]:
    return {"outcome": guard.outcome.value, "result": guard.result, "error": guard.error}


def carried(run: Finished, tries: int) -> dict[str, Any]:
    """A finished run as a retry message's kwarg (JSON): applying it failed ``tries`` times."""
    guard = run.to_record
    return {
        "outcome": run.reply.to_json(),
        "guard": None if guard is None else as_outcome(guard) | {"key": guard.key},
        "tries": tries,
    }


def from_carried(value: dict[str, Any]) -> Finished:
    guard = value.get("guard")
    to_record = None
    if guard is not None:
        to_record = GuardRecord(guard["key"], guard["outcome"], guard["result"], guard["error"])
    return Finished(StepReply.from_json(value["outcome"]), to_record, None)


class _NotAnAction(Exception):
    """The step a killed inline run was running is a compensation (the scan re-sends it)."""


class StepTask(Task):
    """Base class of every step and compensation task (one per step and role)."""

    abstract = True
    max_retries = None  # the saga's RetryPolicy decides, not Celery's counter
    saga: Saga
    step_def: Step
    role: machine.Role
    runner: StepRunner
    store_factory: Any
    redact_fields: tuple[str, ...] = ()
    signing_key: str | None = None  # coordinator_hop: the secret commands are signed with
    # applies an outcome (and records its guard) in one transaction and publishes what
    # follows; None when the chain's coordinator task (``coordinator_hop``) does it
    apply_outcome: Callable[..., str | None] | None = None
    # ``apply_outcome`` that keeps back the next step's message for this delivery to run
    # (``inline_steps``); ``inline``: which deliveries and steps run inline (None: off)
    apply_keeping: Callable[..., tuple[str | None, Any]] | None = None
    inline: InlineSteps | None = None

    def perform(self, **kwargs: Any) -> dict[str, Any]:
        """The task body: run the step through the runner; then either record the outcome
        and hand it down the chain (``coordinator_hop``), or record it and apply it to the
        saga in one transaction.

        The store failing is retried with capped exponential backoff and never counts
        against the step's retry policy: before the participant ran, the task runs later
        (``store_retries`` counts those retries out of the attempt numbers); after, the
        retry carries the outcome (``applying``) and only records and applies it, without
        running the participant again.

        With ``inline_steps``, the saga's next steps may then run here, one after the
        other, in this delivery (``integration.inline``); the reply is this step's."""
        run = self.inline.begin(self, self.request) if self.inline is not None else None
        reply, follow_up = self._perform(kwargs, run)
        while follow_up is not None:
            task, step_kwargs = follow_up
            try:
                follow_up = task.run_inline(step_kwargs, self.request, run)
            except Exception as exc:
                # back to the broker, not acked: the message comes back stale and has the
                # step its delivery began re-sent (``Resend``), or the relay publishes it
                logger.exception(
                    "saga %s %s: its inline run failed; the message goes back to the queue",
                    step_kwargs.get("saga_id"),
                    task.name,
                    extra={"saga_id": step_kwargs.get("saga_id"), "saga": self.saga.name},
                )
                raise Reject(exc, requeue=True) from exc
        return reply

    def run_inline(
        self, kwargs: dict[str, Any], outer: Any, run: InlineRun | None
    ) -> FollowUp | None:
        """This step, run in the delivery ``outer`` (the request of the task that began
        it) under a request of its own, as a first try: a retry is published (Celery's
        ``retry`` on that request), which ends the inline run. Returns what runs next."""
        own_id = uuid()  # a retry from this run is published under it
        self.push_request(
            id=own_id,
            args=[],
            kwargs=kwargs,
            retries=0,
            called_directly=False,
            delivery_info=outer.delivery_info,
            root_id=outer.root_id,
            parent_id=outer.id,
            hostname=outer.hostname,
            ignore_result=True,
        )
        try:
            logger.debug(
                "saga %s %s %s: runs inline in task %s",
                kwargs.get("saga_id"),
                self.step_def.name,
                self.role,
                outer.id,
                extra={"saga_id": kwargs.get("saga_id"), "saga": self.saga.name},
            )
            return self._perform(kwargs, run)[1]
        except Retry:  # published: the step runs again as a message of its own
            if run is not None:  # its marker names the retry, not this delivery
                self._hand_over(str(kwargs.get("key")), run.delivery, own_id)
            return None
        finally:
            self.pop_request()

    def _stuck_recorder(self, kwargs: dict[str, Any]) -> Callable[[], None] | None:
        """For an action: what the watchdog (``integration.alarm``) records before it ends
        a process stuck past the step's hard limit, as ``on_failure`` records Celery's
        hard limit: the step timed out. None for a compensation (it must finish: the
        message's budget and the scan see to it)."""
        hard = self.time_limit
        if self.role != machine.Role.ACTION or self.apply_outcome is None or not hard:
            return None
        saga_id, key = str(kwargs["saga_id"]), str(kwargs["key"])
        step, token = int(kwargs["step"]), int(kwargs["token"])
        error = (
            f"timed out: still running past its hard time limit ({hard:g}s), "
            "stuck where it could not be interrupted; its pool child was killed"
        )
        return lambda: self._record_timeout(saga_id, step, token, key, error)

    def _record_timeout(self, saga_id: str, step: int, token: int, key: str, error: str) -> None:
        """The action ``step`` timed out (a hard limit ended it): its guard and the
        transition, in one transaction; compensation follows."""
        assert self.apply_outcome is not None
        failed = machine.StepFailed(step, token, error, business=False, timed_out=True)
        self.apply_outcome(saga_id, failed, GuardRecord(key, GuardOutcome.ERROR, error=error), None)

    def _hand_over(self, key: str, delivery: str, to: str) -> None:
        """Best effort: ``key``'s started marker naming ``delivery`` names ``to``. A store
        outage leaves it as it was (logged)."""
        try:
            self.store_factory().hand_over_started(key, delivery, to)
        except StoreUnavailableError as exc:
            logger.warning("step %s: started marker left naming %s (%s)", key, delivery, exc)

    def _perform(
        self, kwargs: dict[str, Any], inline: InlineRun | None
    ) -> tuple[dict[str, Any], FollowUp | None]:
        """One step's run (``perform``): its reply and the step to run next in this
        delivery, if any."""
        carried_run = kwargs.pop(CARRIED, None)
        waited = int(kwargs.get(STORE_RETRIES, 0))
        message = None if carried_run else StepMessage.parse(kwargs)
        if not carried_run and message is None:
            return {"outcome": "ignored", "reason": "malformed"}, None
        # the delivery the step's started marker names: the one running it, inline or not
        delivery = inline.delivery if inline is not None else self.request.id
        try:
            if message is None:
                run: StepRun = from_carried(carried_run)
            elif self.apply_outcome is None:  # coordinator_hop: a signed command
                run = self._run_command(kwargs, message)
            else:
                stuck = self._stuck_recorder(kwargs) if inline is not None else None
                limits = inline.limits(self, stuck) if inline is not None else None
                store = self.store_factory()
                run = self.runner.run(store, message, self._tries(waited), delivery, limits)
        except StoreUnavailableError as exc:  # the saga could not be read: nothing ran
            again = {**kwargs, STORE_RETRIES: waited + 1}
            raise self._retry_for_store(exc, "begin", waited, again) from exc
        if isinstance(run, Ignored):
            return {"outcome": "ignored", "reason": run.reason}, None  # tasks.IGNORED
        if isinstance(run, Resend):
            try:
                return self._resend(kwargs["saga_id"], run, str(delivery)), None
            except StoreUnavailableError as exc:  # the marker stays: a retry finds it again
                again = {**kwargs, STORE_RETRIES: waited + 1}
                raise self._retry_for_store(exc, "re-send", waited, again) from exc
        if isinstance(run, OtherDefinition):  # back to the queue, for a worker that has it
            again = {**kwargs, STORE_RETRIES: waited + 1}
            unknown = UnknownDefinitionError(f"definition {run.definition} is not installed here")
            raise self._retry_for_store(unknown, "run", waited, again)
        if isinstance(run, RetryLater):
            countdown = max(0.0, (run.when - utcnow()).total_seconds())
            # Celery does not carry kwargsrepr over to a retry: mask the payload again
            shown = kwargs_repr(self.request.kwargs or {}, self.redact_fields)
            raise self.retry(exc=run.error, countdown=countdown, kwargsrepr=shown)
        try:
            return self._finish(run, kwargs, inline)
        except (StoreUnavailableError, ConcurrentUpdateError) as exc:
            tries = int((carried_run or {}).get("tries", 0))
            again = {**kwargs, CARRIED: carried(run, tries + 1)}
            raise self._retry_for_store(exc, "record the outcome of", tries, again) from exc

    def _resend(self, saga_id: str, run: Resend, delivery: str) -> dict[str, Any]:
        """This delivery began the saga's current step inline and died: send it again
        (nothing runs here). First its started marker goes, so the step is sent but not
        begun: from then on the relay publishes its outbox row if nothing else does.
        Then ``machine.Abandoned`` re-sends it at once, and logs why."""
        self.store_factory().hand_over_started(run.key, delivery, None)
        if self.apply_outcome is not None:
            try:
                event = machine.Abandoned(run.step, run.token, run.detail)
                self.apply_outcome(saga_id, event)
            except (StoreUnavailableError, ConcurrentUpdateError) as exc:
                logger.warning(
                    "saga %s: re-send of step %s not committed (%s); the relay publishes it",
                    saga_id,
                    run.step,
                    exc,
                    extra={"saga_id": saga_id, "saga": self.saga.name},
                )
        return {"outcome": "ignored", "reason": "stale", "resent": run.step}

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Celery calls this in the worker's main process when the hard time limit killed
        the pool child running an action: the step timed out (it may have acted), so it
        is recorded failed and compensated now. In an inline run the step that was running
        may be a later one than the message's: the one whose ``started`` marker names this
        delivery. A killed compensation is sent again by the scanner once its time is up
        (it must finish)."""
        if not isinstance(exc, TimeLimitExceeded) or self.apply_outcome is None:
            return
        if not isinstance(kwargs, dict):
            return
        error = f"timed out: killed at its hard time limit ({exc})"
        saga_id = kwargs.get("saga_id")
        try:
            running = self._running_inline(str(saga_id), task_id)
            if running is None:
                running = (self.role, int(kwargs["step"]), int(kwargs["token"]), str(kwargs["key"]))
            role, step, token, key = running
            if role != machine.Role.ACTION:
                return
            self._record_timeout(str(saga_id), step, token, key, error)
        except Exception as failed:  # the scanner's deadline is the backstop
            logger.warning(
                "saga %s %s: could not record the hard time limit (%s)",
                saga_id,
                self.step_def.name,
                failed,
                extra={"saga_id": saga_id, "saga": self.saga.name, "step": self.step_def.name},
            )

    def _running_inline(
        self, saga_id: str, delivery: str
    ) -> tuple[machine.Role, int, int, str] | None:
        """The step this delivery was running when it was killed, if its ``started``
        marker names the delivery (role, step, token, guard key); None: look no further
        than the message's own step."""
        if self.inline is None:
            return None
        store = self.store_factory()
        record = store.load(saga_id)
        if record is None:
            return None
        found = abandoned_by(self.saga, record, store.get_guard, delivery)
        if found is None:
            return None
        forward = record.state in machine.FORWARD_STATES
        role = machine.Role.ACTION if forward else machine.Role.COMPENSATION
        return role, found.step, found.token, found.key

    def _run_command(self, kwargs: dict[str, Any], message: StepMessage) -> StepRun:
        """Verify the command's signature and expiry before anything runs."""
        refused = refusal(kwargs, self.name, self.signing_key or "", utcnow())
        if refused is not None:
            return self.runner.refuse(message, refused, "signed command refused")
        return self.runner.run_command(message, self._tries(0))

    def _finish(
        self, run: Finished, kwargs: dict[str, Any], inline: InlineRun | None
    ) -> tuple[dict[str, Any], FollowUp | None]:
        if self.apply_outcome is None:  # the chain's coordinator task records and applies it
            return handed_down(run), None
        event = run.reply.event(self.role, kwargs["step"], kwargs["token"])
        if inline is None or self.apply_keeping is None:
            self.apply_outcome(kwargs["saga_id"], event, run.to_record, run.snapshot)
            return run.reply.to_json(), None
        saga_id = kwargs["saga_id"]
        pick = inline.picks(saga_id)
        _, follow_up = self.apply_keeping(saga_id, event, run.to_record, run.snapshot, pick)
        return run.reply.to_json(), follow_up

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

    def _tries(self, store_retries: int) -> int:
        """This delivery's try of the participant: Celery's retries, less the retries
        that only waited for the store."""
        return int(self.request.retries) - store_retries + 1
