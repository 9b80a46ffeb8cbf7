"""What the saga database says about all sagas, as plain numbers (no I/O here).

``store/stats.py`` computes a :class:`SagaStats` with a few aggregate queries;
``metrics.py`` turns one into Prometheus metric families at scrape time. Keeping the numbers
in a frozen value between the two keeps the exporter testable without a database.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from celery_sagas.machine.dead_letters import DeadLetterStatus

# Upper bounds (seconds) of the duration histograms. Steps run from milliseconds (a database
# write) to minutes (the default step timeout is 300 s), so the bounds span both.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)

STATES: tuple[str, ...] = (
    "STARTED",
    "PENDING",
    "COMPENSATING",
    "COMPLETED",
    "FAILED",
    "COMPENSATION_FAILED",
)
DEAD_LETTER_STATUSES: tuple[str, ...] = tuple(status.value for status in DeadLetterStatus)


def bucket_bounds(
    budgets: Iterable[float] = (), base: Iterable[float] = DEFAULT_BUCKETS
) -> tuple[float, ...]:
    """Histogram bounds: ``base`` plus every step timeout budget, so that the p99-over-budget
    alert compares against a real bucket boundary (exact, no interpolation across it), and a
    finite bound above the largest budget (``histogram_quantile`` never reports more than
    the highest finite bound)."""
    budgets = [float(b) for b in budgets]
    bounds = sorted({float(b) for b in (*base, *budgets)})
    if not bounds or bounds[0] <= 0:
        raise ValueError(f"histogram bounds must be positive, got {bounds!r}")
    if budgets and max(budgets) >= bounds[-1]:
        bounds.append(2 * max(budgets))
    return tuple(bounds)


@dataclass(frozen=True)
class Histogram:
    """Durations in seconds: ``cumulative[i]`` observations were ``<= bounds[i]``;
    ``count`` includes the ones above the last bound."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.cumulative):
            raise ValueError("a histogram needs one cumulative count per bound")

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls(bounds, (0,) * len(bounds))

    def __add__(self, other: Histogram) -> Histogram:
        if self.bounds != other.bounds:
            raise ValueError("cannot add histograms with different bounds")
        return Histogram(
            self.bounds,
            tuple(a + b for a, b in zip(self.cumulative, other.cumulative, strict=True)),
            self.count + other.count,
            self.total + other.total,
        )


@dataclass(frozen=True)
class StepStats:
    """One step of one saga type, over every saga of that type."""

    durations: Histogram
    compensation_durations: Histogram
    retries: int = 0  # forward attempts beyond the first
    compensation_retries: int = 0
    timeouts: int = 0

    def __add__(self, other: StepStats) -> StepStats:
        return StepStats(
            self.durations + other.durations,
            self.compensation_durations + other.compensation_durations,
            self.retries + other.retries,
            self.compensation_retries + other.compensation_retries,
            self.timeouts + other.timeouts,
        )


StepKey = tuple[str, str]  # (saga name, step name)
OutcomeKey = tuple[str, str]  # (saga name, outcome: "completed" | "failed")
OUTCOMES: tuple[str, ...] = ("completed", "failed")


@dataclass(frozen=True)
class SagaStats:
    """Counts over every saga in the database.

    ``states``: saga name -> state -> sagas now in that state (``STATES``).
    ``compensation_failed``: saga name -> sagas whose compensation ever gave up (went to the DLQ).
    ``steps``: (saga, step) -> durations, retries and timeouts.
    ``dead_letters``: dead-letter rows by status (``DEAD_LETTER_STATUSES``).
    ``oldest_unfinished_age``: saga name -> age in seconds of the oldest saga still moving
    (STARTED, PENDING or COMPENSATING); absent when there is none.
    ``durations``: (saga, outcome) -> how long finished sagas took, start to end (``OUTCOMES``).
    ``stuck``: saga name -> sagas still moving longer than the stuck threshold.
    ``unknown_definition``: saga name -> unfinished sagas started with a definition the
    reader's app does not have installed (another version's workers must finish them).
    """

    states: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    compensation_failed: Mapping[str, int] = field(default_factory=dict)
    steps: Mapping[StepKey, StepStats] = field(default_factory=dict)
    dead_letters: Mapping[str, int] = field(default_factory=dict)
    oldest_unfinished_age: Mapping[str, float] = field(default_factory=dict)
    durations: Mapping[OutcomeKey, Histogram] = field(default_factory=dict)
    stuck: Mapping[str, int] = field(default_factory=dict)
    unknown_definition: Mapping[str, int] = field(default_factory=dict)

    @property
    def saga_names(self) -> tuple[str, ...]:
        return tuple(
            sorted(
                {
                    *self.states,
                    *self.compensation_failed,
                    *(s for s, _ in self.steps),
                    *(s for s, _ in self.durations),
                    *self.stuck,
                }
            )
        )

    def in_state(self, saga: str, state: str) -> int:
        return self.states.get(saga, {}).get(state, 0)

    def started(self, saga: str) -> int:
        """Every saga of this type ever stored (each row was started once)."""
        return sum(self.states.get(saga, {}).values())

    @property
    def dlq_depth(self) -> int:
        """Dead letters waiting for an operator."""
        return self.dead_letters.get("dead", 0)


def add_states(
    a: Mapping[str, Mapping[str, int]], b: Mapping[str, Mapping[str, int]]
) -> dict[str, dict[str, int]]:
    """Per-saga, per-state counts of ``a`` and ``b`` added together."""
    merged: dict[str, dict[str, int]] = {name: dict(counts) for name, counts in a.items()}
    for name, counts in b.items():
        target = merged.setdefault(name, {})
        for state, count in counts.items():
            target[state] = target.get(state, 0) + count
    return merged


def add_steps(
    a: Mapping[StepKey, StepStats], b: Mapping[StepKey, StepStats]
) -> dict[StepKey, StepStats]:
    merged = dict(a)
    for key, value in b.items():
        merged[key] = merged[key] + value if key in merged else value
    return merged


def add_histograms(
    a: Mapping[OutcomeKey, Histogram], b: Mapping[OutcomeKey, Histogram]
) -> dict[OutcomeKey, Histogram]:
    merged = dict(a)
    for key, value in b.items():
        merged[key] = merged[key] + value if key in merged else value
    return merged
