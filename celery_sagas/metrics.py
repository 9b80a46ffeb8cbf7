"""Prometheus metrics for sagas, computed from the saga database at scrape time.

Nothing is counted inside worker processes, so the numbers are right under prefork (no
multiprocess directory) and survive worker restarts: every scrape asks a
``Callable[[], SagaStats]`` (``store.stats.StatsReader``) and turns the answer into metric
families. The only module that imports ``prometheus_client``, lazily, behind the
``prometheus`` extra (``pip install 'celery-sagas[prometheus]'``)::

    from celery_sagas import metrics
    from celery_sagas.store.stats import StatsReader

    server = metrics.serve(StatsReader(url), "0.0.0.0", 9808)
    server.wait()

(``StatsReader(url, prepare=False)`` behind a pooler in transaction mode with psycopg 3,
like the store's ``prepared_statements=False``.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from celery_sagas.errors import SagaConfigurationError
from celery_sagas.log import logger
from celery_sagas.machine import Role
from celery_sagas.stats import DEAD_LETTER_STATUSES, STATES, Histogram, SagaStats

StatsSource = Callable[[], SagaStats]
StepBudgets = Mapping[tuple[str, str], float]  # (saga, step) -> timeout in seconds
Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class Spec:
    """One metric family. Counter names are given without ``_total``."""

    name: str
    kind: Kind
    doc: str
    labels: tuple[str, ...] = ()

    @property
    def sample_names(self) -> tuple[str, ...]:
        if self.kind == "counter":
            return (f"{self.name}_total",)
        if self.kind == "histogram":
            return tuple(f"{self.name}{s}" for s in ("_bucket", "_count", "_sum"))
        return (self.name,)


P = "celery_sagas"
STARTED = Spec(f"{P}_started", "counter", "Sagas started (saga rows).", ("saga",))
COMPLETED = Spec(f"{P}_completed", "counter", "Sagas that completed.", ("saga",))
FAILED = Spec(f"{P}_failed", "counter", "Sagas that failed and were compensated.", ("saga",))
COMPENSATION_FAILED = Spec(
    f"{P}_compensation_failed",
    "counter",
    "Sagas whose compensation gave up and went to the dead-letter queue.",
    ("saga",),
)
IN_STATE = Spec(f"{P}_in_state", "gauge", "Sagas now in each state.", ("saga", "state"))
SAGA_DURATION = Spec(
    f"{P}_duration_seconds",
    "histogram",
    "How long finished sagas took from start to COMPLETED (outcome=completed) or to FAILED "
    "after their compensations (outcome=failed).",
    ("saga", "outcome"),
)
STUCK = Spec(
    f"{P}_stuck",
    "gauge",
    "Sagas still moving (STARTED, PENDING, COMPENSATING) longer than the stuck threshold "
    "(SAGAS_STUCK_AFTER, default 600 s).",
    ("saga",),
)
STEP_DURATION = Spec(
    f"{P}_step_duration_seconds",
    "histogram",
    "Duration of finished step actions (completed, failed or timed out).",
    ("saga", "step"),
)
COMPENSATION_DURATION = Spec(
    f"{P}_compensation_duration_seconds",
    "histogram",
    "Duration of finished compensations.",
    ("saga", "step"),
)
RETRIES = Spec(
    f"{P}_step_retries",
    "counter",
    "Attempts beyond the first, of finished actions (role=action) and compensations.",
    ("saga", "step", "role"),
)
TIMEOUTS = Spec(f"{P}_step_timeouts", "counter", "Step actions that timed out.", ("saga", "step"))
BUDGET = Spec(
    f"{P}_step_timeout_budget_seconds",
    "gauge",
    "The step's timeout (its latency budget); a bucket bound of the duration histogram.",
    ("saga", "step"),
)
DEAD_LETTERS = Spec(f"{P}_dead_letters", "gauge", "Dead-letter rows by status.", ("status",))
DLQ_DEPTH = Spec(f"{P}_dlq_depth", "gauge", "Dead letters waiting for an operator.")
UNKNOWN_DEFINITION = Spec(
    f"{P}_unknown_definition",
    "gauge",
    "Unfinished sagas started with a definition the exporter's app does not have installed "
    "(a rolling deploy: another version's workers must finish them).",
    ("saga",),
)
OLDEST = Spec(
    f"{P}_oldest_unfinished_saga_age_seconds",
    "gauge",
    "Age of the oldest saga still moving (STARTED, PENDING, COMPENSATING); 0 if none.",
    ("saga",),
)
UP = Spec(f"{P}_database_up", "gauge", "1 if the last scrape could read the saga database.")
SCRAPE_ERRORS = Spec(
    f"{P}_scrape_errors", "counter", "Scrapes that could not read the saga database."
)
SCRAPE_DURATION = Spec(
    f"{P}_scrape_duration_seconds", "gauge", "Time the last scrape spent reading the database."
)

SPECS: tuple[Spec, ...] = (
    STARTED,
    COMPLETED,
    FAILED,
    COMPENSATION_FAILED,
    IN_STATE,
    SAGA_DURATION,
    STUCK,
    STEP_DURATION,
    COMPENSATION_DURATION,
    RETRIES,
    TIMEOUTS,
    BUDGET,
    DEAD_LETTERS,
    DLQ_DEPTH,
    OLDEST,
    UNKNOWN_DEFINITION,
    UP,
    SCRAPE_ERRORS,
    SCRAPE_DURATION,
)


def _client() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SagaConfigurationError(
            "saga metrics need prometheus_client: pip install 'celery-sagas[prometheus]'"
        ) from exc
    return prometheus_client


def _family(spec: Spec) -> Any:
    core = _client().core
    make = {
        "counter": core.CounterMetricFamily,
        "gauge": core.GaugeMetricFamily,
        "histogram": core.HistogramMetricFamily,
    }[spec.kind]
    return make(spec.name, spec.doc, labels=list(spec.labels))


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    to_go = _client().utils.floatToGoString
    pairs = [
        (to_go(b), float(c)) for b, c in zip(histogram.bounds, histogram.cumulative, strict=True)
    ]
    return [*pairs, ("+Inf", float(histogram.count))]


class SagaCollector:
    """A ``prometheus_client`` collector: each ``collect()`` reads one ``SagaStats``.

    If the source raises (database down, statement timeout), the scrape still answers:
    ``celery_sagas_database_up 0`` and ``celery_sagas_scrape_errors_total`` go up, the
    saga series are left out (so alerts do not act on stale numbers), and one warning is
    logged. ``step_budgets`` adds ``celery_sagas_step_timeout_budget_seconds``.
    """

    def __init__(
        self,
        source: StatsSource,
        step_budgets: StepBudgets | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.step_budgets = dict(step_budgets or {})
        self.clock = clock
        self._errors = 0
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Any]:
        """The families without samples: registering the collector reads no database."""
        for spec in SPECS:
            yield _family(spec)

    def collect(self) -> Iterator[Any]:
        started = self.clock()
        try:
            stats = self.source()
        except Exception as exc:  # never let a scrape crash the server
            with self._lock:
                self._errors += 1
            logger.warning("saga metrics: cannot read the saga database: %s", exc)
            yield from self._health(up=False, seconds=self.clock() - started)
            return
        yield from self.families(stats)
        yield from self._health(up=True, seconds=self.clock() - started)

    def _health(self, *, up: bool, seconds: float) -> Iterator[Any]:
        with self._lock:
            errors = self._errors
        values = {UP: 1.0 if up else 0.0, SCRAPE_ERRORS: float(errors), SCRAPE_DURATION: seconds}
        for spec, value in values.items():
            family = _family(spec)
            family.add_metric([], value)
            yield family

    def families(self, stats: SagaStats) -> Iterator[Any]:
        """The saga metric families for one ``SagaStats`` (pure)."""
        yield from self._saga_counts(stats)
        yield from self._step_families(stats)
        yield from self._dead_letter_families(stats)

    def _saga_counts(self, stats: SagaStats) -> Iterator[Any]:
        names = stats.saga_names
        counters: dict[Spec, Callable[[str], int]] = {
            STARTED: stats.started,
            COMPLETED: lambda saga: stats.in_state(saga, "COMPLETED"),
            FAILED: lambda saga: stats.in_state(saga, "FAILED"),
            COMPENSATION_FAILED: lambda saga: stats.compensation_failed.get(saga, 0),
        }
        for spec, count in counters.items():
            family = _family(spec)
            for saga in names:
                family.add_metric([saga], float(count(saga)))
            yield family
        in_state = _family(IN_STATE)
        for saga in names:
            found = stats.states.get(saga, {})
            for state in (*STATES, *sorted(set(found) - set(STATES))):
                in_state.add_metric([saga, state], float(found.get(state, 0)))
        yield in_state
        oldest, stuck = _family(OLDEST), _family(STUCK)
        for saga in names:
            oldest.add_metric([saga], stats.oldest_unfinished_age.get(saga, 0.0))
            stuck.add_metric([saga], float(stats.stuck.get(saga, 0)))
        unknown = _family(UNKNOWN_DEFINITION)
        for saga in sorted({*names, *stats.unknown_definition}):
            unknown.add_metric([saga], float(stats.unknown_definition.get(saga, 0)))
        yield from (oldest, stuck, unknown)
        durations = _family(SAGA_DURATION)
        for (saga, outcome), histogram in sorted(stats.durations.items()):
            durations.add_metric([saga, outcome], _buckets(histogram), histogram.total)
        yield durations

    def _step_families(self, stats: SagaStats) -> Iterator[Any]:
        forward, undo = _family(STEP_DURATION), _family(COMPENSATION_DURATION)
        retries, timeouts = _family(RETRIES), _family(TIMEOUTS)
        for (saga, step), numbers in sorted(stats.steps.items()):
            labels = [saga, step]
            for family, histogram in (
                (forward, numbers.durations),
                (undo, numbers.compensation_durations),
            ):
                family.add_metric(labels, _buckets(histogram), histogram.total)
            retries.add_metric([*labels, Role.ACTION.value], float(numbers.retries))
            retries.add_metric(
                [*labels, Role.COMPENSATION.value], float(numbers.compensation_retries)
            )
            timeouts.add_metric(labels, float(numbers.timeouts))
        budget = _family(BUDGET)
        for (saga, step), seconds in sorted(self.step_budgets.items()):
            budget.add_metric([saga, step], float(seconds))
        yield from (forward, undo, retries, timeouts, budget)

    def _dead_letter_families(self, stats: SagaStats) -> Iterator[Any]:
        by_status = _family(DEAD_LETTERS)
        extra = sorted(set(stats.dead_letters) - set(DEAD_LETTER_STATUSES))
        for status in (*DEAD_LETTER_STATUSES, *extra):
            by_status.add_metric([status], float(stats.dead_letters.get(status, 0)))
        depth = _family(DLQ_DEPTH)
        depth.add_metric([], float(stats.dlq_depth))
        yield from (by_status, depth)


def exported_names(collector: SagaCollector | None = None) -> frozenset[str]:
    """Every sample name the collector can export (``…_total``, ``…_bucket`` included),
    derived from what ``describe()`` yields."""
    by_name = {spec.name: spec for spec in SPECS}
    families = (collector or SagaCollector(SagaStats)).describe()
    return frozenset(n for family in families for n in by_name[family.name].sample_names)


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint (a daemon thread); ``stop()`` ends it."""

    server: Any
    thread: threading.Thread
    collector: SagaCollector

    @property
    def host(self) -> str:
        return str(self.server.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/metrics"

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C still interrupts)."""
        while self.thread.is_alive():
            self.thread.join(0.5)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve(
    stats_source: StatsSource,
    host: str = "0.0.0.0",
    port: int = 9808,
    *,
    step_budgets: StepBudgets | None = None,
) -> MetricsServer:
    """Serve ``/metrics`` on ``host:port`` (port 0 picks a free one) from a thread."""
    client = _client()
    registry = client.CollectorRegistry(auto_describe=True)
    collector = SagaCollector(stats_source, step_budgets)
    registry.register(collector)
    server, thread = client.start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread, collector)
