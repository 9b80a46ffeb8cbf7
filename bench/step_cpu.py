"""CPU of the default-mode step path per saga, in one process (no worker, no broker).

Runs ``--n`` sagas of ``bench.app``'s 4 no-op steps against a throwaway PostgreSQL
database (created from ``--pg-admin-url``'s server, dropped at the end): each step task's
body (check → guard → run → decide → one transition statement → publish to an in-memory
broker) is called directly and timed with ``time.process_time``. Celery's message
handling and the broker are left out, so changes to the library's own per-step work
show with less noise than in ``bench.py``'s throughput run on a busy machine.

    .venv/bin/python bench/step_cpu.py --n 300
    .venv/bin/python bench/step_cpu.py --n 300 --driver psycopg   # psycopg 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="sagas measured (after 30 warm-up)")
    parser.add_argument(
        "--driver",
        choices=("psycopg2", "psycopg"),
        default="psycopg2",
        help="PostgreSQL driver: psycopg2 (statements PREPAREd by hand) or psycopg (3: "
        "prepares them itself)",
    )
    options = parser.parse_args()
    if options.n < 1:
        parser.error("--n must be >= 1")
    sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]
    from sqlalchemy.engine import make_url
    from support.databases import create_pg_database, drop_pg_database

    created = create_pg_database("sagas_step_cpu")
    driven = make_url(created).set(drivername=f"postgresql+{options.driver}")
    url = driven.render_as_string(hide_password=False)
    os.environ["SAGAS_DATABASE_URL"] = url
    os.environ["CELERY_BROKER_URL"] = "memory://"
    try:
        measure(url, options.n, options.driver)
    finally:
        from celery_sagas.store.engine import dispose_all_after_fork

        dispose_all_after_fork()
        drop_pg_database(created)


def measure(url: str, n: int, driver: str) -> None:
    from celery_sagas.definition import idempotency_key
    from celery_sagas.store.migrate import upgrade

    upgrade(url)
    import bench.app as bench_app

    runtime, saga = bench_app.runtime, bench_app.bench_saga
    tasks = [bench_app.app.tasks[saga.step_task_name(i)] for i in range(len(saga.steps))]
    per_saga = []
    warmup = 30
    for count in range(n + warmup):
        saga_id = runtime.start(saga.name, {"id": f"cpu-{os.getpid()}-{count}"}, None, None).id
        spent = 0.0
        for index, task in enumerate(tasks):
            record = runtime.store.load(saga_id)
            assert record is not None
            key = idempotency_key(saga_id, saga.steps[index].name, "action")
            kwargs = {"saga_id": saga_id, "step": index, "token": record.token, "key": key}
            began = time.process_time()
            outcome = task.run(**kwargs)
            spent += time.process_time() - began
            if outcome.get("outcome") != "ok":
                raise SystemExit(f"step {index} of saga {saga_id}: {outcome}")
        if count >= warmup:
            per_saga.append(spent * 1000)
        if count % 50 == 0:
            print(f"\r{count}/{n + warmup} sagas", end="", file=sys.stderr, flush=True)
    print("\r", end="", file=sys.stderr)
    print(
        f"step-path CPU per saga ({len(tasks)} steps, in process, {driver}, n={n}): "
        f"mean {statistics.mean(per_saga):.2f} ms, median {statistics.median(per_saga):.2f} ms"
    )


if __name__ == "__main__":
    main()
