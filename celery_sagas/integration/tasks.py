"""The thin Celery tasks: start, the coordinator replies, and the outbox relay.

Each one turns its message into an event, hands it to the coordinator and publishes what
the coordinator committed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.utils import uuid

from celery_sagas import machine
from celery_sagas.coordinator import check_payload
from celery_sagas.errors import (
    ConcurrentUpdateError,
    SagaError,
    StoreUnavailableError,
    UnknownDefinitionError,
)
from celery_sagas.integration.config import SAGA_TASK_OPTIONS
from celery_sagas.integration.dispatcher import ADVANCE_TASK, COMPENSATED_TASK, DEAD_LETTER_TASK
from celery_sagas.protocols import GuardOutcome, GuardRecord
from celery_sagas.redaction import redact
from celery_sagas.step_reply import StepReply

if TYPE_CHECKING:
    from celery_sagas.integration.runtime import SagaRuntime

RELAY_TASK = "celery_sagas.relay_outbox"
SCAN_TASK = "celery_sagas.scan"
IGNORED = "ignored"  # the outcome of a step message its saga did not expect
MAX_DLQ_WAIT = 300  # seconds a DLQ message waits per hop: far below any visibility timeout
RETRY_ON_STORE = {
    **SAGA_TASK_OPTIONS,  # late acks, redelivery on a lost child, json: on saga tasks only
    "autoretry_for": (StoreUnavailableError, ConcurrentUpdateError, UnknownDefinitionError),
    "retry_backoff": True,
    "retry_backoff_max": 30,
    "max_retries": 20,
}


class StartSagaTask(Task):
    """``start_saga.delay(payload)`` starts the saga in the caller (durable): the payload
    is checked, the saga row and its first step's outbox row are committed, the step is
    published after commit, and a ``SagaHandle`` is returned (``.id`` is the saga id).
    An invalid payload or a conflicting one raises here and nothing is written; if the
    broker is down the relay publishes later; if the database is down it raises.

    ``start_saga.delay(payload, connection=conn)``: inside the application's transaction
    (a SQLAlchemy ``Connection`` or ``Session`` on the saga database).

    ``start_saga.enqueue(payload)`` (or ``apply_async(..., durable=False)``): the
    message-only start for callers that cannot reach the saga database. The payload is
    checked here, but the saga is only written when a worker runs the start task: the
    order is accepted, not yet durable (a broker that loses the message loses it)."""

    abstract = True
    saga_name: str
    runtime: SagaRuntime

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        kwargs = dict(kwargs or {})
        # ``delay(order, connection=conn)``: a SQLAlchemy Connection or Session (an
        # ``apply_async(connection=…)`` option stays Celery's: a broker connection)
        connection = kwargs.pop("connection", None)
        durable = kwargs.pop("durable", options.pop("durable", True))
        if not durable:
            if connection is not None:
                raise SagaError("connection=... needs the durable start (durable=True)")
            return self.enqueue(*(args or ()), _options=options, **kwargs)
        delayed = sorted(k for k in ("countdown", "eta") if options.get(k) is not None)
        if delayed:
            raise SagaError(
                f"{self.saga_name}.start: {', '.join(delayed)} is not supported by the "
                "durable start (the saga starts now); use enqueue(...) for a delayed message"
            )
        payload = _the_payload(self.saga_name, args, kwargs)
        return self.runtime.start(self.saga_name, payload, options.get("task_id"), connection)

    def enqueue(self, *args: Any, _options: Any = None, **kwargs: Any) -> Any:
        """The message-only start (see the class docstring); returns the AsyncResult of
        the start task, whose id becomes the saga id unless the key already has a saga."""
        options = dict(_options or {})
        payload = _the_payload(self.saga_name, args, kwargs)
        check_payload(self.runtime.sagas[self.saga_name], payload, self.runtime.limits)
        task_id = options.setdefault("task_id", uuid())
        kwargs = {"payload": payload, "saga_id": task_id}
        fields = self.runtime.settings.redact_fields
        options.setdefault("kwargsrepr", repr(redact(kwargs, fields)))
        return super().apply_async((), kwargs, **options)

    def retry(self, *args: Any, **options: Any) -> Any:
        """Celery does not carry argsrepr/kwargsrepr over to a retry: mask them again."""
        fields = self.runtime.settings.redact_fields
        options.setdefault("argsrepr", repr(redact(list(self.request.args or ()), fields)))
        options.setdefault("kwargsrepr", repr(redact(dict(self.request.kwargs or {}), fields)))
        return super().retry(*args, **options)


def handed_guard(role: machine.Role, reply: StepReply, key: Any) -> GuardRecord | None:
    """The guard record a step handed down with its reply, under ``key`` (none for a
    failed compensation: an operator retry must be able to run it again)."""
    if not key or (role == machine.Role.COMPENSATION and reply.outcome == GuardOutcome.ERROR):
        return None
    return GuardRecord(str(key), reply.outcome, reply.result, reply.error)


def _the_payload(saga_name: str, args: Any, kwargs: dict[str, Any]) -> Any:
    """``delay(order)`` or ``delay(payload=order)``: one payload and nothing else."""
    extra = set(kwargs) - {"payload"}
    if len(args or ()) + len(kwargs) != 1 or extra:
        raise TypeError(
            f"{saga_name}.start takes one payload (and connection=..., durable=...); "
            f"got {len(args or ())} positional and {sorted(kwargs)}"
        )
    return args[0] if args else kwargs["payload"]


def register_coordinator_tasks(app: Celery, runtime: SagaRuntime) -> None:
    def record(
        role: machine.Role, outcome: dict[str, Any], saga_id: str, step: int, token: int
    ) -> Any:
        """A participant's outcome handed down the chain: recorded (its guard) and applied
        in one transaction; a stale one changes nothing but its guard."""
        if outcome.get("outcome") == IGNORED:  # the step task refused the message
            return IGNORED
        reply = StepReply.from_json(outcome)
        guard = handed_guard(role, reply, outcome.get("key"))
        return runtime.apply(saga_id, reply.event(role, step, token), guard)

    @app.task(name=ADVANCE_TASK, shared=False, **RETRY_ON_STORE)
    def advance(outcome: dict[str, Any], saga_id: str, step: int, token: int) -> str | None:
        return record(machine.Role.ACTION, outcome, saga_id, step, token)  # type: ignore[no-any-return]

    @app.task(name=COMPENSATED_TASK, shared=False, **RETRY_ON_STORE)
    def compensated(outcome: dict[str, Any], saga_id: str, step: int, token: int) -> str | None:
        return record(machine.Role.COMPENSATION, outcome, saga_id, step, token)  # type: ignore[no-any-return]

    @app.task(name=RELAY_TASK, shared=False, ignore_result=True, expires=30, **SAGA_TASK_OPTIONS)
    def relay_outbox() -> int:
        return runtime.relay()

    @app.task(name=SCAN_TASK, shared=False, ignore_result=True, expires=30, **RETRY_ON_STORE)
    def scan() -> dict[str, int]:
        return runtime.scan()

    @app.task(
        name=DEAD_LETTER_TASK,
        bind=True,
        shared=False,
        ignore_result=True,
        max_retries=None,
        **SAGA_TASK_OPTIONS,
    )
    def dead_letter(self: Task, saga_id: str, step: int) -> str:
        """A message on the DLQ queue. Only a recovery worker (``-Q sagas.dlq``) consumes
        it: it retries the dead compensation on a slow schedule, then gives up for good."""
        verdict, wait = runtime.auto_retry(saga_id, step)
        if wait is not None:
            raise self.retry(countdown=min(wait, MAX_DLQ_WAIT))
        return verdict


def register_start_task(app: Celery, runtime: SagaRuntime, saga_name: str) -> Task:
    @app.task(
        name=f"{saga_name}.start",
        shared=False,  # bound to this app's runtime: another app must not inherit it
        base=StartSagaTask,
        bind=True,
        saga_name=saga_name,
        runtime=runtime,
        **RETRY_ON_STORE,
    )
    def start(self: Task, payload: dict[str, Any], saga_id: str | None = None) -> dict[str, Any]:
        """The message-only start (``enqueue``), run by a worker."""
        return runtime.start_from_message(saga_name, payload, saga_id or self.request.id)

    return start
