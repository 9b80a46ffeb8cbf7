"""The Prometheus collector on a fake stats source: no database, no workers."""

from __future__ import annotations

import logging
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from celery_sagas import metrics
from celery_sagas.errors import StoreUnavailableError
from celery_sagas.stats import (
    DEFAULT_BUCKETS,
    Histogram,
    SagaStats,
    StepStats,
    add_states,
    add_steps,
    bucket_bounds,
)

BOUNDS = (0.1, 1.0, 5.0)
SAGA = "order_fulfillment"


def hist(cumulative: tuple[int, ...], count: int, total: float) -> Histogram:
    return Histogram(BOUNDS, cumulative, count, total)


def sample_stats() -> SagaStats:
    return SagaStats(
        states={
            SAGA: {"COMPLETED": 7, "FAILED": 2, "PENDING": 1, "COMPENSATION_FAILED": 1},
            "refund": {"COMPLETED": 1},
        },
        compensation_failed={SAGA: 2},
        steps={
            (SAGA, "create_shipment"): StepStats(
                durations=hist((3, 8, 9), 10, 12.5),
                compensation_durations=hist((2, 2, 2), 3, 7.25),
                retries=4,
                compensation_retries=6,
                timeouts=1,
            ),
            ("refund", "pay_back"): StepStats(hist((1, 1, 1), 1, 0.05), hist((0, 0, 0), 0, 0.0)),
        },
        dead_letters={"dead": 1, "resolved": 1, "weird": 5},
        oldest_unfinished_age={SAGA: 42.5},
        durations={
            (SAGA, "completed"): hist((1, 6, 7), 7, 9.5),
            (SAGA, "failed"): hist((0, 1, 2), 2, 6.0),
        },
        stuck={SAGA: 3},
    )


def scrape(collector: metrics.SagaCollector) -> dict[tuple[str, frozenset[Any]], float]:
    """Collect through a real registry and parse the text exposition back."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_saga_counters_and_states() -> None:
    samples = scrape(metrics.SagaCollector(sample_stats))
    assert value(samples, "celery_sagas_started_total", saga=SAGA) == 11
    assert value(samples, "celery_sagas_completed_total", saga=SAGA) == 7
    assert value(samples, "celery_sagas_failed_total", saga=SAGA) == 2
    assert value(samples, "celery_sagas_compensation_failed_total", saga=SAGA) == 2
    assert value(samples, "celery_sagas_started_total", saga="refund") == 1
    assert value(samples, "celery_sagas_failed_total", saga="refund") == 0
    assert value(samples, "celery_sagas_compensation_failed_total", saga="refund") == 0
    # every state is present for every saga type, zero-filled
    for state in ("STARTED", "PENDING", "COMPENSATING", "COMPLETED", "FAILED"):
        expected = sample_stats().in_state(SAGA, state)
        assert value(samples, "celery_sagas_in_state", saga=SAGA, state=state) == expected
    assert value(samples, "celery_sagas_in_state", saga="refund", state="STARTED") == 0
    assert value(samples, "celery_sagas_oldest_unfinished_saga_age_seconds", saga=SAGA) == 42.5
    assert value(samples, "celery_sagas_oldest_unfinished_saga_age_seconds", saga="refund") == 0


def test_saga_durations_by_outcome_and_stuck_sagas() -> None:
    samples = scrape(metrics.SagaCollector(sample_stats))
    name = "celery_sagas_duration_seconds"
    done = {"saga": SAGA, "outcome": "completed"}
    assert [value(samples, f"{name}_bucket", le=le, **done) for le in ("0.1", "1.0", "5.0")] == [
        1,
        6,
        7,
    ]
    assert value(samples, f"{name}_count", **done) == 7
    assert value(samples, f"{name}_sum", saga=SAGA, outcome="failed") == 6.0
    assert value(samples, "celery_sagas_stuck", saga=SAGA) == 3
    assert value(samples, "celery_sagas_stuck", saga="refund") == 0


def test_names_do_not_stutter() -> None:
    """Prometheus naming: ``celery_sagas_started_total``, never ``celery_sagas_sagas_…``."""
    assert not [n for n in metrics.exported_names() if n.startswith("celery_sagas_sagas")]


def test_step_histograms_are_cumulative_with_inf_equal_to_count() -> None:
    samples = scrape(metrics.SagaCollector(sample_stats))
    name = "celery_sagas_step_duration_seconds"
    labels = {"saga": SAGA, "step": "create_shipment"}
    buckets = [value(samples, f"{name}_bucket", le=le, **labels) for le in ("0.1", "1.0", "5.0")]
    assert buckets == [3, 8, 9]
    assert value(samples, f"{name}_bucket", le="+Inf", **labels) == 10
    assert value(samples, f"{name}_count", **labels) == 10
    assert value(samples, f"{name}_sum", **labels) == 12.5
    undo = "celery_sagas_compensation_duration_seconds"
    assert value(samples, f"{undo}_bucket", le="0.1", **labels) == 2
    assert value(samples, f"{undo}_count", **labels) == 3
    assert value(samples, f"{undo}_sum", **labels) == 7.25
    retries = "celery_sagas_step_retries_total"
    assert value(samples, retries, role="action", **labels) == 4
    assert value(samples, retries, role="compensation", **labels) == 6
    assert value(samples, "celery_sagas_step_timeouts_total", **labels) == 1
    assert value(samples, "celery_sagas_step_timeouts_total", saga="refund", step="pay_back") == 0


def test_dead_letters_by_status_and_depth() -> None:
    samples = scrape(metrics.SagaCollector(sample_stats))
    assert value(samples, "celery_sagas_dead_letters", status="dead") == 1
    assert value(samples, "celery_sagas_dead_letters", status="retrying") == 0
    assert value(samples, "celery_sagas_dead_letters", status="resolved") == 1
    assert value(samples, "celery_sagas_dead_letters", status="discarded") == 0
    assert value(samples, "celery_sagas_dead_letters", status="weird") == 5  # never hidden
    assert value(samples, "celery_sagas_dlq_depth") == 1


def test_step_budgets_are_exported() -> None:
    budgets = {(SAGA, "create_shipment"): 3.0}
    samples = scrape(metrics.SagaCollector(sample_stats, budgets))
    assert (
        value(
            samples, "celery_sagas_step_timeout_budget_seconds", saga=SAGA, step="create_shipment"
        )
        == 3.0
    )


def test_an_empty_database_exports_only_unlabelled_series() -> None:
    samples = scrape(metrics.SagaCollector(SagaStats))
    assert value(samples, "celery_sagas_dlq_depth") == 0
    assert value(samples, "celery_sagas_database_up") == 1
    assert not [key for key in samples if key[0] == "celery_sagas_started_total"]


def test_a_failing_source_never_breaks_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def down() -> SagaStats:
        nonlocal calls
        calls += 1
        raise StoreUnavailableError("cannot read saga stats from postgresql+psycopg2://db")

    collector = metrics.SagaCollector(down)
    with caplog.at_level(logging.WARNING, logger="celery_sagas"):
        first = scrape(collector)
        second = scrape(collector)
    assert calls == 2
    assert value(first, "celery_sagas_database_up") == 0
    assert value(first, "celery_sagas_scrape_errors_total") == 1
    assert value(second, "celery_sagas_scrape_errors_total") == 2
    assert not [key for key in second if any(label == "saga" for label, _ in key[1])]
    assert "cannot read the saga database" in caplog.text
    assert "store_unavailable" in caplog.text


def test_the_error_counter_survives_recovery() -> None:
    outcomes: Iterator[SagaStats | Exception] = iter([RuntimeError("boom"), sample_stats()])

    def flaky() -> SagaStats:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    collector = metrics.SagaCollector(flaky)
    scrape(collector)
    samples = scrape(collector)
    assert value(samples, "celery_sagas_database_up") == 1
    assert value(samples, "celery_sagas_scrape_errors_total") == 1
    assert value(samples, "celery_sagas_started_total", saga=SAGA) == 11


def test_registering_reads_no_stats() -> None:
    def boom() -> SagaStats:
        raise AssertionError("describe() must not read the database")

    CollectorRegistry().register(metrics.SagaCollector(boom))


def test_exported_names_match_what_collect_yields() -> None:
    budgets = {(SAGA, "create_shipment"): 3.0}
    seen = {name for name, _ in scrape(metrics.SagaCollector(sample_stats, budgets))}
    seen |= {name for name, _ in scrape(metrics.SagaCollector(_raise))}
    assert seen == set(metrics.exported_names())
    assert all(name.startswith("celery_sagas_") for name in seen)


def _raise() -> SagaStats:
    raise RuntimeError("down")


def test_serve_answers_over_http() -> None:
    server = metrics.serve(sample_stats, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(server.url, timeout=5) as response:
            body = response.read().decode()
        assert response.status == 200
    finally:
        server.stop()
    assert 'celery_sagas_completed_total{saga="order_fulfillment"} 7.0' in body


def test_metrics_imports_neither_prometheus_client_nor_sqlalchemy_up_front() -> None:
    code = (
        "import sys, celery_sagas.metrics, celery_sagas.stats;"
        "bad = [m for m in ('prometheus_client', 'sqlalchemy', 'celery_sagas.store') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the pure stats values -------------------------------------------------------------


def test_bucket_bounds_include_every_budget_once() -> None:
    assert bucket_bounds([3, 300.0, 0.5]) == tuple(sorted({*DEFAULT_BUCKETS, 3.0}))
    assert bucket_bounds([], base=(2, 1)) == (1.0, 2.0)
    assert bucket_bounds([2], base=(1, 2)) == (1.0, 2.0, 4.0)  # a finite bucket above it
    with pytest.raises(ValueError, match="positive"):
        bucket_bounds([0])


def test_histograms_and_step_stats_add_up() -> None:
    a = StepStats(hist((1, 2, 3), 4, 1.5), hist((0, 0, 1), 1, 2.0), 1, 2, 3)
    total = a + a
    assert total.durations == hist((2, 4, 6), 8, 3.0)
    assert (total.retries, total.compensation_retries, total.timeouts) == (2, 4, 6)
    with pytest.raises(ValueError, match="different bounds"):
        _ = a.durations + Histogram((1.0,), (1,), 1, 1.0)
    with pytest.raises(ValueError, match="one cumulative count per bound"):
        Histogram((1.0, 2.0), (1,))


def test_states_and_steps_merge() -> None:
    merged = add_states({"a": {"X": 1}}, {"a": {"X": 2, "Y": 1}, "b": {"X": 1}})
    assert merged == {"a": {"X": 3, "Y": 1}, "b": {"X": 1}}
    step = StepStats(hist((1, 1, 1), 1, 0.1), hist((0, 0, 0), 0, 0.0))
    steps = add_steps({("a", "s"): step}, {("a", "s"): step, ("a", "t"): step})
    assert steps[("a", "s")].durations.count == 2
    assert steps[("a", "t")] == step
