"""``install(app, sagas)``: wires declared sagas into a Celery app.

Registers the start, step, compensation and coordinator tasks, routes, the beat
schedule and the reliability settings. The store is created lazily, once per process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import SoftTimeLimitExceeded
from kombu.entity import Queue

from celery_sagas import dlq, machine, outbox, scanner, signing
from celery_sagas.coordinator import Coordinator, PayloadLimits, Timing, utcnow
from celery_sagas.definition import Saga, registry
from celery_sagas.errors import SagaConfigurationError, SagaError
from celery_sagas.handle import SagaHandle, find
from celery_sagas.heartbeat import Heartbeats
from celery_sagas.integration.config import (
    SAGA_TASK_OPTIONS,
    add_routes,
    check_app,
    warn_inline_runs_past_visibility,
)
from celery_sagas.integration.crash import crash_point
from celery_sagas.integration.dispatcher import (
    ADVANCE_TASK,
    COMPENSATED_TASK,
    DEAD_LETTER_TASK,
    CeleryDispatcher,
    step_kwargs,
)
from celery_sagas.integration.hook_task import HOOK_LEASE, register_hook_task
from celery_sagas.integration.inline import (
    InlineSteps,
    budget,
    note_worker_limits,
    unlimited_steps,
)
from celery_sagas.integration.pools import watch_pools
from celery_sagas.integration.quiet import quiet_periodic_tasks
from celery_sagas.integration.steps import StepTask
from celery_sagas.integration.tasks import (
    RELAY_TASK,
    SCAN_TASK,
    register_coordinator_tasks,
    register_start_task,
)
from celery_sagas.log import logger
from celery_sagas.protocols import GuardRecord, OutboxMessage, SagaRecord
from celery_sagas.runner import StepRunner, policy_for
from celery_sagas.settings import SagaSettings
from celery_sagas.store import SqlSagaStore, dispose_all_after_fork

CALLER_PUBLISH_RETRY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}


class SagaRuntime:
    """Everything ``install`` set up for one app: settings, store, coordinator, tasks."""

    def __init__(self, app: Celery, sagas: Mapping[str, Saga], settings: SagaSettings) -> None:
        self.app = app
        self.sagas = sagas
        self.settings = settings
        # inline_steps: a timed step's message carries the budget of its inline run
        step_budget = self.step_budget if settings.inline_steps else None
        self.dispatcher = CeleryDispatcher(
            app,
            sagas,
            settings.redact_fields,
            settings.coordinator_hop,
            self.sign if settings.coordinator_hop else None,
            budget=step_budget,
        )
        # the caller's start publishes with few, quick retries: a broker outage must not
        # hold the application (the outbox row stays unsent and the relay publishes it)
        self.caller_dispatcher = CeleryDispatcher(
            app,
            sagas,
            settings.redact_fields,
            settings.coordinator_hop,
            self.sign if settings.coordinator_hop else None,
            publish_options={"retry": True, "retry_policy": CALLER_PUBLISH_RETRY},
            budget=step_budget,
        )
        self.limits = PayloadLimits(
            settings.max_payload_bytes, settings.max_payload_depth, settings.max_key_length
        )
        self.timing = Timing(
            step_timeouts=settings.step_timeouts,
            saga_deadlines=settings.saga_deadlines,
            max_concurrent=settings.max_concurrent,
            max_redispatches=settings.max_redispatches,
            time_limit_grace=settings.time_limit_grace,
            queue_timeout=settings.queue_timeout,
            untimed_resend=settings.resend_untimed_after,
            heartbeat_lease=settings.heartbeat_lease,
        )
        # runs the next step in the task of the one before (``inline_steps``); None: off
        self.inline = (
            InlineSteps(app, self.dispatcher.step_task_name, step_kwargs)
            if settings.inline_steps
            else None
        )
        # keeps the markers of running untimed steps fresh (the scan's liveness signal)
        self.heartbeats = Heartbeats(
            lambda: self.store, settings.heartbeat_interval, utcnow, settings.heartbeat_lease
        )
        self.start_tasks: dict[str, Task] = {}
        self._store: SqlSagaStore | None = None
        self._coordinator: Coordinator | None = None
        # the store and coordinator are made on first use, possibly by several pool
        # threads (or greenlets) at once: one of them makes each
        self._making = threading.Lock()
        # the engine's pool for this worker's concurrency (integration.pools), under the
        # configured engine_options
        self.engine_defaults: dict[str, Any] = {}

    def step_budget(self, saga: Saga, role: machine.Role, index: int) -> float | None:
        """A step message's time limit with ``inline_steps`` (``inline.budget``)."""
        return budget(self.timing.timeouts(saga), self.settings.time_limit_grace, role, index)

    @property
    def store(self) -> SqlSagaStore:
        if self._store is None:
            with self._making:
                if self._store is None:
                    self._store = self._make_store()
        return self._store

    def _make_store(self) -> SqlSagaStore:
        if not self.settings.database_url:
            raise SagaConfigurationError(
                "this worker has no saga database (a coordinator_hop participant "
                "worker): route the coordinator, start, scan and relay tasks to workers "
                "that set SAGAS_DATABASE_URL"
            )
        return SqlSagaStore(
            self.settings.database_url,
            prepare=self.settings.prepared_statements,
            **{**self.engine_defaults, **self.settings.engine_options},
        )

    def size_engine_pool(self, options: dict[str, int]) -> dict[str, int]:
        """A worker's pool defaults, before the store is made; ``pool_size`` configured in
        ``engine_options`` wins. What was taken (nothing, then)."""
        if "pool_size" in self.settings.engine_options or self._store is not None:
            return {}
        self.engine_defaults.update(options)
        return dict(options)

    def sign(
        self, kwargs: dict[str, Any], task_name: str, saga: Saga, index: int
    ) -> dict[str, Any]:
        """A step command for a participant worker without the saga database: stamped with
        its expiry and signed (``celery_sagas.signing``)."""
        timing = self.timing
        valid = signing.validity(
            timing.timeouts(saga)[index], timing.queue_timeout, timing.time_limit_grace
        )
        expires_at = utcnow() + timedelta(seconds=valid)
        return signing.sign(kwargs, task_name, self.settings.signing_key or "", expires_at)

    @property
    def coordinator(self) -> Coordinator:
        if self._coordinator is None:
            store = self.store
            with self._making:
                if self._coordinator is None:
                    self._coordinator = Coordinator(
                        store,
                        self.sagas,
                        utcnow,
                        self.timing,
                        redact_fields=self.settings.redact_fields,
                        auto_retry_interval=self.settings.dlq_auto_retry_interval,
                        messages_with_data=self.settings.coordinator_hop,
                        limits=self.limits,
                    )
        return self._coordinator

    def start_task(self, saga_name: str) -> Task:
        """The task application code calls: ``start_task("order_fulfillment").delay(order)``."""
        try:
            return self.start_tasks[saga_name]
        except KeyError:
            raise SagaError(
                f"unknown saga {saga_name!r}; installed: {sorted(self.sagas)}"
            ) from None

    # -- what the tasks do ----------------------------------------------------------

    def start(
        self,
        saga_name: str,
        payload: Any,
        saga_id: str | None = None,
        connection: Any = None,
    ) -> SagaHandle:
        """The durable start, in the caller: saga row + first step's outbox row committed
        (in the store's transaction, or in ``connection``'s: a ``Connection`` or
        ``Session``), then published. A publish that fails is left to the relay; a
        ``Session`` publishes when it commits; a ``Connection`` leaves it to
        ``handle.publish()`` after commit, or to the relay."""
        outcome = self.coordinator.start(saga_name, payload, saga_id, within=connection)

        def publish() -> int:
            return outbox.publish(self.store, self.caller_dispatcher, outcome.messages, utcnow)

        if connection is None:
            publish()
            return SagaHandle(self.store, outcome.saga_id, outcome.created, publish)

        def publish_if_committed() -> int:
            """After the caller's commit (a ``Session``'s event, or ``handle.publish()``):
            nothing if the saga was rolled back (a savepoint, or no commit at all)."""
            return publish() if self.store.load(outcome.saga_id) is not None else 0

        self.store.after_commit(connection, publish_if_committed)
        return SagaHandle(self.store, outcome.saga_id, outcome.created, publish_if_committed)

    def start_from_message(
        self, saga_name: str, payload: dict[str, Any], saga_id: str | None = None
    ) -> dict[str, Any]:
        """The message-only start (``start_saga.enqueue``), run by the start task."""
        outcome = self.coordinator.start(saga_name, payload, saga_id)
        outbox.publish(self.store, self.dispatcher, outcome.messages, utcnow)
        return {"saga_id": outcome.saga_id, "created": outcome.created}

    def claim_hook(self, key: str) -> str:
        return self.store.claim_once(key, utcnow(), HOOK_LEASE)

    def finish_hook(self, key: str, saga_id: str) -> None:
        self.store.finish_claim(key, saga_id, utcnow())

    def release_hook(self, key: str) -> None:
        self.store.release_claim(key)

    def get(self, ref: str, name: str | None = None) -> SagaHandle:
        """A handle on the saga whose id is ``ref``, or of type ``name`` whose business
        key is ``ref``; ``SagaNotFoundError``, or ``AmbiguousSagaError`` if the key is used
        by several saga types and no ``name`` is given."""
        record = find(self.store, ref, name)
        return SagaHandle(self.store, record.saga_id)

    def apply(
        self,
        saga_id: str,
        event: machine.Event,
        guard: GuardRecord | None = None,
        known: SagaRecord | None = None,
    ) -> str | None:
        state, _ = self.apply_keeping(saga_id, event, guard, known)
        return state

    def apply_keeping(
        self,
        saga_id: str,
        event: machine.Event,
        guard: GuardRecord | None = None,
        known: SagaRecord | None = None,
        pick: Callable[[OutboxMessage], Any] | None = None,
    ) -> tuple[str | None, Any]:
        """Apply ``event`` (one transaction) and publish what it sends, except the first
        message ``pick`` answers for (not None): its answer is returned for the caller to
        run (``inline_steps``), and its outbox row stays unsent, so the relay publishes it
        if the caller never begins it."""
        outcome = self.coordinator.handle(saga_id, event, guard, known)
        if outcome.messages:
            crash_point("after_commit")
        kept, picked = None, None
        if pick is not None:
            kept, picked = next(
                ((m, p) for m in outcome.messages if (p := pick(m)) is not None), (None, None)
            )
        others = [message for message in outcome.messages if message is not kept]
        outbox.publish(self.store, self.dispatcher, others, utcnow)
        decision = outcome.decision
        if decision is None:
            return None, picked
        state = decision.state.value if decision.accepted and decision.state else "ignored"
        return state, picked

    def scan(self) -> dict[str, int]:
        report = scanner.scan(
            self.coordinator,
            utcnow(),
            batch=self.settings.scan_batch,
            stuck_after=self.settings.stuck_after,
        )
        outbox.publish(self.store, self.dispatcher, report.messages, utcnow)
        # routine housekeeping: logged at DEBUG, not in the result (whose non-zero values
        # make the periodic log filter keep the task's "succeeded" line)
        scanner.compact(
            self.store,
            utcnow(),
            after=self.settings.compact_after,
            batch=self.settings.compact_batch,
        )
        return {
            "timed_out": report.timed_out,
            "resent": report.resent,
            "compensation_given_up": report.compensation_given_up,
            "admitted": report.admitted,
            "stuck": report.stuck,
        }

    def publish(self, messages: Sequence[OutboxMessage]) -> int:
        return outbox.publish(self.store, self.dispatcher, messages, utcnow)

    def auto_retry(self, saga_id: str, step: int) -> tuple[str, float | None]:
        """The DLQ recovery worker's slow automatic retry of one dead compensation."""
        verdict, result = dlq.auto_retry(
            self.coordinator,
            saga_id,
            step,
            max_retries=self.settings.dlq_auto_retries,
            interval=self.settings.dlq_auto_retry_interval,
        )
        if result is not None:
            self.publish(result.messages)
        return verdict.action, verdict.wait

    def relay(self) -> int:
        return outbox.relay(
            self.store,
            self.dispatcher,
            utcnow,
            older_than=self.settings.relay_after,
            batch=self.settings.relay_batch,
        )


def time_limits(timeout: float | None, grace: float) -> dict[str, float]:
    """Celery's limits for a step task of ``timeout`` seconds: the soft limit interrupts
    the participant at its timeout, the hard limit replaces its pool child ``grace``
    seconds later if it ignored that."""
    if timeout is None:
        return {}
    return {"soft_time_limit": timeout, "time_limit": timeout + grace}


def _register_step_tasks(app: Celery, runtime: SagaRuntime, saga: Saga) -> None:
    timeouts = runtime.timing.timeouts(saga)
    for index, step in enumerate(saga.steps):
        for role, name in (
            (machine.Role.ACTION, saga.step_task_name(index)),
            (machine.Role.COMPENSATION, saga.compensation_task_name(index)),
        ):

            def run(self: StepTask, **kwargs: Any) -> dict[str, Any]:
                return self.perform(**kwargs)

            policy = policy_for(saga, step, role, runtime.settings.retry_policies)
            runner = StepRunner(
                saga,
                index,
                role,
                policy,
                utcnow,
                (SoftTimeLimitExceeded,),
                redact_fields=runtime.settings.redact_fields,
                heartbeats=runtime.heartbeats if timeouts[index] is None else None,
            )
            app.task(
                name=name,
                base=StepTask,
                bind=True,
                saga=saga,
                step_def=step,
                role=role,
                runner=runner,
                store_factory=staticmethod(lambda: runtime.store),
                redact_fields=runtime.settings.redact_fields,
                signing_key=runtime.settings.signing_key,
                apply_outcome=None if runtime.settings.coordinator_hop else runtime.apply,
                apply_keeping=runtime.apply_keeping,
                inline=runtime.inline,
                **SAGA_TASK_OPTIONS,  # late acks, redelivery on a lost child, json
                shared=False,  # bound to this app's runtime: another app must not inherit it
                ignore_result=True,  # the saga database holds outcomes; chains pass them on
                **time_limits(timeouts[index], runtime.settings.time_limit_grace),
            )(run)
            queue = step.queue or version_queue(app, saga)
            if queue:
                add_routes(app, {name: {"queue": queue}})
    if saga.version is not None and not all(step.queue for step in saga.steps):
        _consume_by_default(app, version_queue(app, saga) or "")


def version_queue(app: Celery, saga: Saga) -> str | None:
    """An explicitly versioned saga's steps go to a queue of that version
    (``celery.v2``), which only workers that have the version installed consume (a worker
    without ``-Q`` does): a worker of an older deploy never receives them."""
    if saga.version is None:
        return None
    return f"{app.conf.task_default_queue or 'celery'}.v{saga.version}"


def _route_coordinator(app: Celery, settings: SagaSettings, sagas: Sequence[Saga]) -> None:
    """The coordinator's tasks on ``coordinator_queue`` if set; beat's scan and relay on
    ``control_queue``, where no backlog of steps can delay them."""
    routes: dict[str, Any] = {}
    if settings.coordinator_queue:
        names = [ADVANCE_TASK, COMPENSATED_TASK, RELAY_TASK, SCAN_TASK]
        names += [f"{s.name}.start" for s in sagas]
        routes.update({n: {"queue": settings.coordinator_queue} for n in names})
    if settings.control_queue:
        routes.update({n: {"queue": settings.control_queue} for n in (RELAY_TASK, SCAN_TASK)})
        _consume_by_default(app, settings.control_queue)
    add_routes(app, routes)


def _consume_by_default(app: Celery, queue: str) -> None:
    """A worker started without ``-Q`` consumes ``queue`` next to the default one. An app
    that declares its own ``task_queues`` is left as it is, and told which queue a worker
    must consume."""
    if app.conf.task_queues is None:
        app.conf.task_queues = (Queue(app.conf.task_default_queue or "celery"),)
        app._celery_sagas_declared_queues = True
    if queue in {q.name for q in app.conf.task_queues}:
        return
    if getattr(app, "_celery_sagas_declared_queues", False):
        app.conf.task_queues = (*app.conf.task_queues, Queue(queue))
        return
    logger.warning(
        "celery-sagas: saga tasks go to the queue %r, which task_queues does not declare: "
        "run a worker with -Q %s",
        queue,
        queue,
    )


def install(app: Celery, sagas: Sequence[Saga], **settings: Any) -> SagaRuntime:
    """Wire ``sagas`` into ``app``. Keyword arguments override ``sagas_*`` config keys
    (``database_url=...``, ``relay_interval=...``)."""
    found = registry(sagas)
    runtime = SagaRuntime(app, found, SagaSettings.from_config(app.conf, **settings))
    timing = runtime.timing  # configured timeouts win over declared ones
    check_app(app, [t or 0.0 for saga in sagas for t in timing.timeouts(saga)])
    register_coordinator_tasks(app, runtime)
    register_hook_task(app, runtime)
    for saga in sagas:
        _register_step_tasks(app, runtime, saga)
        runtime.start_tasks[saga.name] = register_start_task(app, runtime, saga.name)
    _route_coordinator(app, runtime.settings, sagas)
    if runtime.settings.inline_steps:
        untimed = unlimited_steps({saga.name: timing.timeouts(saga) for saga in sagas})
        _say_what_runs_inline(untimed)
        action = machine.Role.ACTION  # an action's budget covers every compensation too
        budgets = (runtime.step_budget(s, action, i) for s in sagas for i in range(len(s.steps)))
        warn_inline_runs_past_visibility(app.conf, [b for b in budgets if b is not None])
        signals.worker_init.connect(note_worker_limits, weak=False)
    add_routes(app, {DEAD_LETTER_TASK: {"queue": runtime.settings.dlq_queue}})
    app.conf.beat_schedule = {
        **(app.conf.beat_schedule or {}),
        RELAY_TASK: {"task": RELAY_TASK, "schedule": runtime.settings.relay_interval},
        SCAN_TASK: {"task": SCAN_TASK, "schedule": runtime.settings.scan_interval},
    }
    signals.worker_process_init.connect(_dispose_engines, weak=False)
    timed = any(t is not None for saga in sagas for t in timing.timeouts(saga))
    watch_pools(app, timed, runtime.settings.max_redispatches, runtime.size_engine_pool)
    quiet_periodic_tasks((RELAY_TASK, SCAN_TASK))  # no INFO lines when they did nothing
    app._celery_sagas_runtime = runtime  # read by `celery -A app sagas …`
    return runtime


def _say_what_runs_inline(untimed: Mapping[str, Sequence[int]]) -> None:
    """``inline_steps`` is on: which steps (``untimed``: those without a timeout, by saga)
    run inline in any pool, and that the others do only in a prefork worker."""
    for name, indexes in untimed.items():
        logger.info(
            "celery-sagas: inline_steps: saga %s: steps with a timeout run inline in prefork "
            "workers only (each timed by the worker itself), published elsewhere; steps "
            "without one (%s) in any pool, after a step without one",
            name,
            indexes or "none",
        )


def _dispose_engines(**_: Any) -> None:
    dispose_all_after_fork()
