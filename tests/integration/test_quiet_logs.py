"""An idle worker and beat at ``-l INFO`` log nothing periodic: the relay and the scan run
every half second here, and neither Celery's "Sending due task", "received" and "succeeded"
lines nor the library's own lines about them appear while they have nothing to do."""

from __future__ import annotations

from typing import Any

from tests.integration.conftest import Deployment
from tests.integration.test_deadlines import running
from tests.support.processes import wait_until

PERIODIC = ("celery_sagas.scan", "celery_sagas.relay_outbox")
RUNS = 6  # each task ran at least this many times: a dozen scan intervals


def task_totals(hostname: str) -> dict[str, int]:
    from workers.app import app

    replies = app.control.inspect(destination=[hostname], timeout=2).stats() or {}
    return dict(replies.get(hostname, {}).get("total", {}))


def test_an_idle_worker_and_beat_log_nothing_periodic_at_info(deployment: Deployment) -> None:
    with running(deployment, beat_loglevel="INFO", SAGAS_RELAY_INTERVAL=0.5) as (worker, beat):
        start_worker, start_beat = len(worker.log_text()), len(beat.log_text())

        def ran_enough() -> Any:
            totals = task_totals(worker.hostname or "")
            return totals if all(totals.get(t, 0) >= RUNS for t in PERIODIC) else None

        totals = wait_until(ran_enough, timeout=30, interval=0.5, message="periodic tasks ran")
        lines = (
            worker.log_text()[start_worker:].splitlines()
            + beat.log_text()[start_beat:].splitlines()
        )
    periodic = [line for line in lines if any(t in line for t in PERIODIC) or "scan:" in line]
    print(f"{sum(totals[t] for t in PERIODIC)} periodic runs, {len(lines)} log lines")
    assert periodic == [], "\n".join(periodic[:10])
