"""DBOS's direct workflow with the same 4 no-op steps as the bench saga, for the rounds.

    .venv-peers/bin/python bench/dbos_peer.py --n 2000 [--processes 2] [--threads 2]
        [--step-ms 0] [--pg-admin-url postgresql+psycopg2://postgres@127.0.0.1:5432/postgres]

Runs in ``.venv-peers`` (``make bench-peers``), never in the project's virtualenv. It creates
a throwaway database for DBOS's system tables, migrates it once, then starts ``--processes``
processes; each launches DBOS and calls the workflow directly (``bench_workflow(i)``: the
workflow and its 4 steps are checkpointed in PostgreSQL, like a saga's steps) from
``--threads`` threads. The processes wait for each other before the clock starts. Prints
one JSON line: ``per_second`` (workflows), ``seconds``, ``n``, ``processes``, ``threads``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa
from dbos import DBOS, DBOSConfig

WARMUP = 20  # workflows per process before the clock starts
STEP_SECONDS = float(os.environ.get("BENCH_STEP_MS") or 0) / 1000


def io_wait() -> None:
    if STEP_SECONDS:
        time.sleep(STEP_SECONDS)


@DBOS.step()
def step_1() -> int:
    io_wait()
    return 1


@DBOS.step()
def step_2() -> int:
    io_wait()
    return 2


@DBOS.step()
def step_3() -> int:
    io_wait()
    return 3


@DBOS.step()
def step_4() -> int:
    io_wait()
    return 4


@DBOS.workflow()
def bench_workflow(number: int) -> int:
    return step_1() + step_2() + step_3() + step_4() + number * 0


def dbos_config(url: str, executor: str) -> DBOSConfig:
    """Each process is an executor of its own: one launching must not recover (take over)
    the workflows another one is running."""
    return {
        "name": "celery-sagas-bench-peer",
        "system_database_url": url,
        "executor_id": executor,
        "log_level": "WARNING",
    }


def run_process(url: str, first: int, count: int, threads: int, ready: Any, out: Any) -> None:
    """One process: launch DBOS, warm up, wait for the others, run ``count`` workflows."""
    DBOS(config=dbos_config(url, f"bench-peer-{first}"))
    DBOS.launch()
    try:
        for number in range(WARMUP):
            bench_workflow(-1 - number - first)
        ready.wait()
        started = time.time()
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(bench_workflow, range(first, first + count)))
        finished = time.time()
        if results != [10] * count:
            raise RuntimeError("a workflow returned a wrong result")
        out.put((started, finished))
    finally:
        DBOS.destroy()


def admin_engine(url: str) -> sa.Engine:
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def run(n: int, processes: int, threads: int, admin_url: str) -> dict[str, Any]:
    admin = admin_engine(admin_url)
    name = f"dbos_peer_{os.getpid()}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(admin_url).set(drivername="postgresql", database=name)
    system_url = url.render_as_string(hide_password=False)
    try:
        # migrate once, before the processes race
        DBOS(config=dbos_config(system_url, "bench-peer-migrate"))
        DBOS.launch()
        DBOS.destroy()
        context = multiprocessing.get_context("spawn")
        ready, out = context.Barrier(processes), context.Queue()
        share = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
        firsts = [sum(share[:i]) for i in range(processes)]
        workers = [
            context.Process(
                target=run_process, args=(system_url, first, count, threads, ready, out)
            )
            for first, count in zip(firsts, share, strict=True)
        ]
        for worker in workers:
            worker.start()
        spans = [out.get(timeout=3600) for _ in workers]
        for worker in workers:
            worker.join()
            if worker.exitcode != 0:
                raise RuntimeError(f"a DBOS process exited {worker.exitcode}")
        seconds = max(end for _, end in spans) - min(start for start, _ in spans)
        return {
            "per_second": n / seconds,
            "seconds": seconds,
            "n": n,
            "processes": processes,
            "threads": threads,
            "step_ms": STEP_SECONDS * 1000,
        }
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="workflows in all")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="per process")
    parser.add_argument("--step-ms", type=float, default=0.0, help="each step waits this long")
    parser.add_argument(
        "--pg-admin-url", default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args()
    if min(args.n, args.processes, args.threads) < 1 or args.step_ms < 0:
        parser.error("--n, --processes and --threads must be >= 1, --step-ms >= 0")
    os.environ["BENCH_STEP_MS"] = f"{args.step_ms:g}"  # the spawned processes read it
    global STEP_SECONDS
    STEP_SECONDS = args.step_ms / 1000
    print(json.dumps(run(args.n, args.processes, args.threads, args.pg_admin_url)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
