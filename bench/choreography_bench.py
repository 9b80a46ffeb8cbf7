"""Benchmark: events/s and sagas/s of a 4-service no-op choreography.

    python bench/choreography_bench.py [--n 500] [--concurrency 2] [--json]

It creates a throwaway PostgreSQL database (the saga tables and the services' guard and
outbox tables), takes a Redis DB (the test suite's lease, as ``bench/bench.py`` does),
starts a real prefork ``celery worker`` for ``bench.choreography_app`` and starts N sagas
from this process (each: saga row + start event committed, then published). Completion
is read from the ``saga`` table. Per saga: 5 events, 4 handler hops, each hop one
service transaction (guard + outbox) and one tracking transaction on the saga row.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import sqlalchemy as sa

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench import (  # noqa: E402  (needs the repository on sys.path)
    DEFAULT_PG_ADMIN_URL,
    DEFAULT_REDIS_URL,
    BenchError,
    admin_engine,
    check_postgres,
    check_redis,
    create_database,
    create_schema,
    drop_database,
    end_progress,
    leased_redis_db,
    progress,
    wait_for,
)

APP = "bench.choreography_app"


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="sagas per run")
    parser.add_argument("--warmup", type=int, default=20, help="uncounted sagas first")
    parser.add_argument("--concurrency", type=int, default=2, help="prefork pool size")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="Redis server")
    parser.add_argument("--redis-db", type=int, default=11, help="Redis DB to use (flushed)")
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a wait may take")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    options = parser.parse_args(argv)
    if options.n < 1 or options.warmup < 0 or options.concurrency < 1:
        parser.error("--n and --concurrency must be >= 1, --warmup >= 0")
    return options


@contextlib.contextmanager
def worker(
    env: dict[str, str], concurrency: int, log_dir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    hostname = f"choreo-bench-{os.getpid()}@{socket.gethostname()}"
    log_path = log_dir / "worker.log"
    command = [
        sys.executable, "-m", "celery", "-A", APP, "worker", "-P", "prefork",
        "-c", str(concurrency), "-n", hostname, "--without-gossip", "--without-mingle",
        "--without-heartbeat", "-l", "WARNING",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=log_dir, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield process
    except BaseException:
        end_progress()
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        print("worker log, last lines:\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def completed(url: str, name: str) -> int:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM saga WHERE name = :n AND state = 'COMPLETED'"),
                    {"n": name},
                ).scalar_one()
            )
    finally:
        engine.dispose()


class Batch:
    def __init__(
        self, app_module: ModuleType, url: str, process: subprocess.Popen[bytes], timeout: float
    ) -> None:
        self.app_module, self.url, self.process, self.timeout = app_module, url, process, timeout

    def run(self, count: int, done_before: int, label: str) -> float:
        """Start ``count`` sagas and wait for them; seconds from the first start to the
        last completion."""
        started = time.monotonic()
        for number in range(count):
            self.app_module.on.start({"order": number})
        target = done_before + count

        def finished() -> int | None:
            if self.process.poll() is not None:
                raise BenchError(f"the worker exited with code {self.process.returncode}")
            done = completed(self.url, self.app_module.NAME)
            progress(f"{label}: {done - done_before}/{count} sagas completed")
            return done if done >= target else None

        wait_for(finished, what=f"{count} sagas to complete", timeout=self.timeout, interval=0.2)
        end_progress()
        return time.monotonic() - started


def run(options: argparse.Namespace) -> dict[str, Any]:
    admin = admin_engine(options.pg_admin_url)
    check_postgres(admin)
    broker = f"{options.redis_url}/{options.redis_db}"
    with contextlib.ExitStack() as stack:
        stack.enter_context(leased_redis_db(options.redis_url, options.redis_db))
        check_redis(broker).flushdb()
        name = f"celery_sagas_choreo_bench_{os.getpid()}"
        url = create_database(admin, name)
        stack.callback(drop_database, admin, name)
        create_schema(url)
        env = {"CELERY_BROKER_URL": broker, "SAGAS_DATABASE_URL": url}
        os.environ.update(env)
        paths = (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)  # the worker imports bench
        from celery_sagas.store.service_outbox import create_service_tables

        create_service_tables(url)
        app_module = importlib.import_module(APP)
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="choreo-bench-")))
        process = stack.enter_context(worker(env, options.concurrency, log_dir))
        batch = Batch(app_module, url, process, options.timeout)
        if options.warmup:
            batch.run(options.warmup, 0, "warm-up")
        seconds = batch.run(options.n, options.warmup, "run")
    n = options.n
    return {
        "n": n,
        "concurrency": options.concurrency,
        "seconds": round(seconds, 3),
        "sagas_per_s": round(n / seconds, 1),
        "events_per_s": round(n * app_module.EVENTS_PER_SAGA / seconds, 1),
        "handler_hops_per_s": round(n * app_module.HOPS_PER_SAGA / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    try:
        result = run(options)
    except BenchError as exc:
        print(f"choreography bench: {exc}", file=sys.stderr)
        return 1
    if options.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"order-like choreography, {result['n']} sagas, prefork -c {result['concurrency']}: "
            f"{result['sagas_per_s']} sagas/s, {result['events_per_s']} events/s "
            f"({result['handler_hops_per_s']} handler hops/s) in {result['seconds']} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
